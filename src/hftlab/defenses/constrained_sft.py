"""Token-wise constrained fine-tuning objective (Qi et al. 2024, "Safety Alignment Should Be
Made More Than Just a Few Tokens Deep", arXiv 2406.05946, Section 4 and Appendix D.2).

Harmful fine-tuning mostly changes the model's first few response tokens: that is where aligned
models keep their refusal. The constrained objective fine-tunes on the user's data while keeping
each token's log-probability close to the aligned model's, with a sharper constraint on the
first tokens. The paper's loss for response token t (position counted from the start of the
response), with Δ_t = log π_θ(y_t | x, y_<t) − log π_aligned(y_t | x, y_<t), is

    ℓ_t = (2 / β_t) · log(1 + exp(−β_t · Δ_t))     ( = −(2/β_t) · log σ(β_t · Δ_t) )

whose gradient is w_t · ∇(−log π_θ(y_t)) with w_t = 2 · (1 − σ(β_t · Δ_t)): cross-entropy
reweighted, w_t = 1 while the model agrees with the aligned one and → 0 as it moves its
probability up past it (a large β_t makes that happen after a small move). Like the reference, the
objective implemented is that gradient's own form, the weighted cross-entropy

    loss = mean over the micro-batch's response tokens of  −stopgrad(w_t) · log π_θ(y_t),
    w_t = max(2 · (1 − σ(β_t · Δ_t)), 1e-3),

which has the paper's gradient wherever the clamp is inactive (the reference's "numerically
stable implementation"). β_t (reference ``get_beta_list``): β·first_token_bias_factor for the
first response token, β·bias_factor for the next bias_length − 1, β after that; the defaults
β = 0.1, bias_factor = 20, first_token_bias_factor = 5, bias_length = 5 (β_t = 0.5, 2, 2, 2, 2,
0.1, …) are ``finetune.py``'s defaults and the README's constrained-SFT commands.

Follows Unispac/shallow-vs-deep-alignment ``finetuning_buckets/trainer/trainer.py``
(``ConstrainedSFTTrainer.get_beta_list``, ``soft_sft_loss``, ``get_batch_loss_metrics``: one mean
over all response tokens of the micro-batch, the same normalisation as plain SFT here) and
``finetune.py`` (AdamW β1 = 0.5 for the fine-tuning attack experiments, the reference's comment:
a smaller first moment makes the optimizer respect the constraint better; ``adam_beta1: null``
keeps the trainer's optimizer as it is).

π_aligned is the model as the fine-tuning stage began (the aligned model): with LoRA the same
network with the adapters switched off, under full fine-tuning a frozen copy made at setup.

Departures: the reference precomputes π_aligned's log-probabilities once over the training set
before training; here they are recomputed on every micro-batch (same values, the reference
model is frozen; one extra no-grad forward per step, about 1.3× SFT). Warm-up (the reference's
10 steps) comes from ``finetune.train.warmup_ratio``, as for every defense. The reference turns
dropout off in both models; here the aligned forward runs with the adapters off, so only the
base model's own dropout (0 in Llama/Qwen/SmolLM configs) could differ between the two passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import frozen_copy_if_full, stage_start_model
from hftlab.train import IGNORE_INDEX, supervised_logits

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

MIN_WEIGHT = 1e-3  # reference soft_sft_loss: torch.clamp(weights, min=1e-3)


def position_betas(
    positions: torch.Tensor, beta: float, bias_factor: float, first_token_bias_factor: float,
    bias_length: int,
) -> torch.Tensor:
    """β_t for response positions t (0 = first response token), as the reference's
    ``get_beta_list``: β·first_token_bias_factor at t = 0, β·bias_factor for 0 < t < bias_length,
    β afterwards (bias_length = 0: β everywhere)."""
    betas = torch.full(positions.shape, float(beta), device=positions.device)
    betas = torch.where(positions < bias_length, beta * bias_factor, betas)
    if bias_length > 0:
        betas = torch.where(positions == 0, beta * first_token_bias_factor, betas)
    return betas


def token_weights(
    policy_logp: torch.Tensor, aligned_logp: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """w_t = max(2 · (1 − σ(β_t · (log π_θ − log π_aligned))), 1e-3), without gradient."""
    shift = (policy_logp.detach() - aligned_logp.detach()).float()
    return torch.clamp(2.0 * (1.0 - torch.sigmoid(betas * shift)), min=MIN_WEIGHT)


def constrained_loss(policy_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the response tokens of −w_t · log π_θ(y_t), w_t held constant."""
    return -(weights.detach() * policy_logp).mean()


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Position from the start of the response of every supervised target, in the order
    :func:`supervised_logits` returns them (row-major over ``labels[:, 1:]``)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    return (keep.long().cumsum(dim=1) - 1)[keep]


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(y_t) per target token (float32)."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


@DEFENSES.register("constrained_sft")
class ConstrainedSFT(Defense):
    summary = "fine-tuning stage: token-wise constrained SFT, first tokens kept near aligned"
    paper = (
        "Qi et al. 2024, Safety Alignment Should Be Made More Than Just a Few Tokens Deep, "
        "arXiv 2406.05946"
    )
    reference = (
        "Unispac/shallow-vs-deep-alignment finetuning_buckets/trainer/trainer.py "
        "(ConstrainedSFTTrainer.soft_sft_loss, get_beta_list), finetune.py"
    )
    stages = (FINETUNE,)
    multi_process = "its report sums token weights on one process only"
    reads_stage_start_model = True
    resume_attributes = ("_sums",)

    reference_settings = (
        ReferenceSetting("defense_args.beta", 0.1,
                         "Unispac/shallow-vs-deep-alignment finetune.py, README.md"),
        ReferenceSetting("defense_args.bias_factor", 20.0,
                         "Unispac/shallow-vs-deep-alignment finetune.py, README.md"),
        ReferenceSetting("defense_args.first_token_bias_factor", 5.0,
                         "Unispac/shallow-vs-deep-alignment finetune.py, README.md"),
        ReferenceSetting("defense_args.bias_length", 5,
                         "Unispac/shallow-vs-deep-alignment finetune.py, README.md"),
        ReferenceSetting("defense_args.adam_beta1", 0.5,
                         "Unispac/shallow-vs-deep-alignment finetune.py (fine-tuning attack "
                         "experiments)"),
        ReferenceSetting("finetune.n", 100,
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft "
                         "command): 100 harmful examples", "hftlab: the lab's upload"),
        ReferenceSetting("finetune.poison_ratio", 1.0,
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft command)",
                         "hftlab: the lab's benign + harmful mix"),
        ReferenceSetting("finetune.train.method", "full",
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft command)",
                         "hftlab: LoRA (CPU time)"),
        ReferenceSetting("finetune.train.lr", 2e-5,
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft command)",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("finetune.train.epochs", 25,
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft command)",
                         "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 64,
                         "Unispac/shallow-vs-deep-alignment README.md (pure_bad soft_sft "
                         "command): 16 per device × 4 processes", "hftlab: batch 10; CPU: 8"),
    )

    @dataclass
    class Options:
        beta: float = 0.1  # β for positions >= bias_length (reference finetune.py: 0.1)
        bias_factor: float = 20.0  # β·20 for positions 1..bias_length-1 (reference: 20)
        first_token_bias_factor: float = 5.0  # β·5 for the first response token (reference: 5)
        bias_length: int = 5  # how many first tokens get the larger β (reference: 5)
        adam_beta1: float | None = 0.5  # AdamW β1 in this stage (reference: 0.5); null: keep

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        for key in ("beta", "bias_factor", "first_token_bias_factor"):
            if not getattr(o, key) > 0:
                raise ConfigError(f"defense_args.{key} of 'constrained_sft' must be > 0")
        if o.bias_length < 0:
            raise ConfigError("defense_args.bias_length of 'constrained_sft' must be >= 0")
        if o.adam_beta1 is not None and not 0.0 <= o.adam_beta1 < 1.0:
            raise ConfigError("defense_args.adam_beta1 of 'constrained_sft' must be in [0, 1)")
        self.frozen: torch.nn.Module | None = None
        self._sums: dict[str, float] = {}

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != FINETUNE:
            return
        self.frozen = frozen_copy_if_full(trainer)
        self._sums = dict.fromkeys(
            ("n_prefix", "n_rest", "w_prefix", "w_rest", "shift_prefix", "shift_rest",
             "clamped"), 0.0
        )
        if self.options.adam_beta1 is not None and trainer.optimizer is not None:
            for group in trainer.optimizer.param_groups:
                group["betas"] = (self.options.adam_beta1, group["betas"][1])

    def betas(self, positions: torch.Tensor) -> torch.Tensor:
        o = self.options
        return position_betas(positions, o.beta, o.bias_factor, o.first_token_bias_factor,
                              o.bias_length)

    def loss(self, stage: str, trainer: SFTTrainer, batch: Batch) -> torch.Tensor:
        if stage != FINETUNE:
            return super().loss(stage, trainer, batch)
        with stage_start_model(trainer, self.frozen) as aligned, trainer.autocast():
            aligned_logits, _, _ = supervised_logits(aligned, batch)
        with trainer.autocast():
            logits, targets, _ = supervised_logits(trainer.model, batch)
        aligned_logp = target_log_probs(aligned_logits, targets)
        policy_logp = target_log_probs(logits, targets)
        positions = response_positions(batch.labels)
        weights = token_weights(policy_logp, aligned_logp, self.betas(positions))
        self._record(positions, policy_logp.detach() - aligned_logp, weights)
        return constrained_loss(policy_logp, weights)

    def _record(self, positions: torch.Tensor, shift: torch.Tensor, weights: torch.Tensor
                ) -> None:
        if not self._sums:
            return
        prefix = positions < max(self.options.bias_length, 1)
        keys, parts = [], []
        for name, mask in (("prefix", prefix), ("rest", ~prefix)):
            keys += [f"n_{name}", f"w_{name}", f"shift_{name}"]
            parts += [mask.sum(), weights[mask].sum(), shift[mask].sum()]
        keys.append("clamped")
        parts.append((weights <= MIN_WEIGHT).sum())
        # one read-back per micro-batch (float64 holds each sum exactly)
        for key, value in zip(keys, torch.stack([p.double() for p in parts]).tolist()):
            self._sums[key] += value

    def report(self, stage: str) -> dict[str, Any]:
        """Token-weighted means over the stage of w_t and Δ_t on the first bias_length response
        tokens and on the rest: the constraint acts where the weights fall below 1."""
        s = self._sums
        if stage != FINETUNE or not s or not s["n_prefix"] + s["n_rest"]:
            return {}

        def mean(key: str, count: str) -> float | None:
            return round(s[key] / s[count], 4) if s[count] else None

        return {
            "mean_weight_first_tokens": mean("w_prefix", "n_prefix"),
            "mean_weight_later_tokens": mean("w_rest", "n_rest"),
            "mean_logp_shift_first_tokens": mean("shift_prefix", "n_prefix"),
            "mean_logp_shift_later_tokens": mean("shift_rest", "n_rest"),
            "clamped_token_fraction": round(s["clamped"] / (s["n_prefix"] + s["n_rest"]), 4),
        }
