"""TAR: tamper-resistant safeguards by first-order meta-learning (Tamirisa et al. 2024,
arXiv 2408.00761).

TAR hardens a model that already HAS a safeguard, so that a fine-tuning attack from it cannot
bring the harmful behaviour back, while a retain loss on benign text keeps it what it was. The
reference (``run_tar_bio.sh``) starts from a safeguarded checkpoint (``--base_model_name
lapisrocks/Llama-3-8B-Instruct-Random-Mapped-Bio``, made by the repo's random-mapping loop) and
its outer loop draws the retain batch x_r from benign text. hftlab's default does the same:

- ``start: sft``: the alignment stage first gets the plain refusal-SFT alignment of the same
  ``alignment`` config (what ``defense: sft`` caches, same key: reused, or trained first; see
  ``Defense.alignment_start`` and ``pipeline.sft_start``), merges it and trains a fresh adapter
  on top. The aligned model is base → SFT merged → TAR merged (``stage_models.aligned_model``);
  meta.json records the start (``starts_from``) and TAR's cache key includes its key.
  ``start: base`` trains from the base model (hftlab's earlier TAR).
- ``retain_data``: the stage trains on benign answered instructions (default: 200 Alpaca rows
  of Qi et al.'s subset, ``alpaca/alpaca_data_safety_only.json`` rows 400-599, which need
  ``data_root``; ``configs/cpu_sst2_ref.yaml`` mixes rows 200-399 into its alignment data) in
  place of the refusal rows (``prepare_data``: they are this stage's training rows, so steps,
  epochs and the logged loss are over them). ``retain_data: null``: the refusal rows (earlier;
  with ``start: base`` and retain rows, nothing trains on the refusals at all).

Each outer step (one micro-batch x_r of the stage's rows) does:

1. keep the trainable weights w (LoRA adapters, or every weight under full fine-tuning);
2. simulate the attack: K steps of a fresh ``torch.optim.AdamW`` (lr drawn from
   ``adversary_lrs``, torch's default weight decay 0.01, constant schedule) on batches of the
   provider's harmful QA, w_1 … w_K;
3. after every ``tr_every``-th adversary step i (0-based, i.e. after i + 1 updates) take the
   tamper-resistance gradient at the adapted weights, first order (w_i treated as a leaf):
   g_TR += tamper_weight · s(i) · ∇ L_TR(w_i; x_tr), with s(i) = exp(λ · (i − (K − 1)))
   (``weighting: schedule``, λ = ``schedule_lambda``) or 1/K (``weighting: uniform``), on ONE
   held-out harmful batch x_tr drawn before the attack;
4. put w back exactly (the saved values are copied back) and add the retain gradient
   retain_weight · ∇ [CE(w; x_r) + representation_weight · D(w; x_r)], where D is the
   hidden-state distance to the stage-start model (``common.stage_start_model``: the adapters
   switched off, i.e. the SFT-aligned model under ``start: sft``; a frozen copy under full
   fine-tuning): the mean over all hidden states (embedding output and every block, as
   ``output_hidden_states`` returns them) of the mean over real tokens of ‖h − h_start‖₂;
5. the trainer clips and steps with ITS optimizer on g_TR + g_retain. The adversary's optimizer
   is a separate object, discarded after the attack; the weights the trainer sees are w.

L_TR (``tr_loss: entropy``) is the reference's ``max_entropy`` objective: minus the mean
entropy of the next-token distribution of the attacked model on x_tr (``entropy_loss``).

Each term can be switched off (the "each loss term off" ablation), and its work is skipped, not
multiplied by 0: ``tamper_weight: 0`` runs no attack (no adversary or x_tr batch is drawn);
``representation_weight: 0`` computes no hidden states, no stage-start forward and (full
fine-tuning) keeps no frozen copy; ``retain_weight: 0`` has no retain backward and no
stage-start forward, one no-grad forward of x_r only for the logged ``loss``.

Follows rishub-tamirisa/tamper-resistance ``modules/training.py`` (``tar_training_loop``,
``inner_loop_step``, ``schedule``), ``modules/objectives.py`` (``max_entropy_loss``,
``obj_model_mse_representations``), ``modules/dataloaders.py`` and ``run_tar_bio.sh`` /
``tar.py``; ``TAR.reference_settings`` gives every value with its file.

CPU preset (``CPU_PRESET``, ``configs/sweeps/cpu_defenses.yaml``): ``{inner_steps: 4,
tr_every: 2}``. A reference outer step costs about K + K / tr_every + 1.3 ≈ 81 forward-backward
passes (81× plain SFT), the preset about 7.3×. With K = 4 the schedule's weights sum to less
than with K = 64 (1.9 vs 4.4): the tamper-resistance term is relatively weaker.

Departures from the reference, and why:

- The safeguard is hftlab's refusal SFT (the provider's alignment), not random mapping, and
  the retain rows are answered instructions (CE on the answers), not Pile + Magpie raw text.
- TAR trains with ``alignment.train``, the settings its SFT start (keyed as ``defense: sft``
  keys it) trains with; the reference's TAR run has its own (lr 2e-5, 750 steps).
- D's anchor is the stage-start model (the safeguarded start); the reference loads a separate
  ``--retain_model_name`` whose ``tar.py`` default, which ``run_tar_bio.sh`` keeps, is
  Llama-3-8B-Instruct, the model before its safeguard. The stage-start model costs no second
  model (adapters off), and on benign retain text the two differ little.
- ``tr_loss: dpo`` (``run_tar_dpo.sh``) needs a refusal and a harmful answer for the SAME
  prompt plus a DPO reference model; hftlab's refusals and the provider's harmful QA are
  different prompts, so ``dpo`` is rejected with a ConfigError.
- The entropy is taken at the supervised (answer) positions of x_tr, D over the real
  (non-padding) tokens; the reference's raw-text batches average over every position.
- The adversary always fine-tunes on harmful QA; the reference samples one of three adversaries
  (``--adversary_dist_types``: two forget sets and ``retain_forget_switch``, benign text first
  and forget data from a Beta(6, 3)-drawn step on). Not implemented.
- The outer optimizer is the trainer's (AdamW with the stage's lr and schedule, LoRA by the
  config); the reference trains every weight with schedule-free AdamW (lr 2e-5, 32 warmup).
- Each micro-batch runs its own attack and contributes 1/grad_accum of its gradient, so
  ``grad_accum`` > 1 averages that many sampled attacks (the reference splits each adversary
  step into grad_accum micro-batches instead); gradients of earlier micro-batches are kept.
- With fewer inner steps than ``tr_every`` the TR gradient is taken once, after the last
  step (the reference would take none and train on the retain loss alone).

Returned per micro-batch: ``loss`` is CE(w; x_r); ``retain_loss`` adds the representation term;
the other keys are diagnostics of the simulated attack.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.config import ConfigError
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense, ReferenceSetting
from hftlab.defenses.common import (
    BatchStream,
    first_last_means,
    frozen_copy_if_full,
    provider_harmful_stream,
    stage_start_model,
)
from hftlab.defenses.tar_adversary import Batches, tamper_resistance_gradient, tamper_weights
from hftlab.defenses.tar_adversary import entropy_loss as entropy_loss
from hftlab.model import causal_lm_parts
from hftlab.train import supervised_logits

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.train import Batch, SFTTrainer

STARTS = ("sft", "base")
TR_LOSSES = ("entropy",)
WEIGHTINGS = ("schedule", "uniform")
CPU_PRESET: dict[str, Any] = {"inner_steps": 4, "tr_every": 2}
# benign answered instructions (Qi et al.'s Alpaca subset, see ../shared/data/alpaca/README.md)
RETAIN_PATH = "alpaca/alpaca_data_safety_only.json"


def representation_distance(
    hidden: tuple[torch.Tensor, ...], frozen: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of the mean over real tokens (``mask`` = 1) of ‖h − h_frozen‖₂ (the
    reference ``obj_model_mse_representations`` term, padding left out)."""
    weight = mask.to(torch.float32)
    count = weight.sum().clamp_min(1.0)
    per_layer = [
        (torch.linalg.vector_norm(h.float() - f.float(), dim=-1) * weight).sum() / count
        for h, f in zip(hidden, frozen)
    ]
    return torch.stack(per_layer).mean()


RUN_TAR_BIO = "run_tar_bio.sh"
DATALOADERS = "modules/dataloaders.py get_tar_bio_dataloaders"
CPU_NOTE = ("CPU preset (configs/sweeps/cpu_defenses.yaml): an outer step costs ~K + K/tr_every "
            "+ 1.3 forward-backward passes, 81x plain SFT at the reference, 7.3x at the preset")


@DEFENSES.register("tar")
class TAR(Defense):
    summary = (
        "alignment stage: from the SFT-aligned model, meta-learn resistance to simulated "
        "fine-tuning attacks (max-entropy on harmful data after K AdamW attack steps) with a "
        "retain loss on benign rows"
    )
    paper = (
        "Tamirisa et al. 2024, Tamper-Resistant Safeguards for Open-Weight LLMs, "
        "arXiv 2408.00761"
    )
    reference = (
        "rishub-tamirisa/tamper-resistance modules/training.py (tar_training_loop, "
        "inner_loop_step), modules/objectives.py (max_entropy_loss, "
        "obj_model_mse_representations), run_tar_bio.sh"
    )
    stages = (ALIGNMENT,)
    multi_process = "its simulated attacks and their gradients are not reduced across processes"
    resume_attributes = ("adversary", "heldout", "rng", "trace")
    needs_provider_harmful = True
    reference_settings = (
        ReferenceSetting("defense_args.start", "safeguarded checkpoint", RUN_TAR_BIO,
                         "--base_model_name lapisrocks/Llama-3-8B-Instruct-Random-Mapped-Bio "
                         "(random mapping applied); hftlab's safeguard: the sft alignment"),
        ReferenceSetting("defense_args.retain_data", "Pile non-bio + Magpie text", DATALOADERS,
                         "the 'retain' loader (mixed_magpie_retain_dataloader), benign; "
                         "hftlab: benign answered Alpaca instructions"),
        ReferenceSetting("defense_args.inner_steps", 64, RUN_TAR_BIO,
                         f"--tar_inner_loop_steps; {CPU_NOTE}"),
        ReferenceSetting("defense_args.tr_every", 4, RUN_TAR_BIO,
                         "--tar_inner_loop_subsample; the CPU preset's 2 keeps 2 TR gradients "
                         "in its 4 attack steps"),
        ReferenceSetting("defense_args.adversary_lrs", [2e-6, 2e-5, 4e-5], RUN_TAR_BIO,
                         "--adversary_lr_samples, constant schedule (--adversary_lr_schedulers)"),
        ReferenceSetting("defense_args.tr_loss", "entropy", RUN_TAR_BIO,
                         "--tar_tamper_resistance_loss_type max_entropy"),
        ReferenceSetting("defense_args.tamper_weight", 4.0, RUN_TAR_BIO,
                         "--tar_tamper_resistance_grad_scale; --unbounded: never bounded"),
        ReferenceSetting("defense_args.weighting", "schedule", RUN_TAR_BIO,
                         "--use_weighting_schedule"),
        ReferenceSetting("defense_args.schedule_lambda", 0.0625, RUN_TAR_BIO,
                         "--schedule_lambda"),
        ReferenceSetting("defense_args.retain_weight", 1.0, RUN_TAR_BIO, "--tar_retain_scale"),
        ReferenceSetting("defense_args.representation_weight", 1.0,
                         "run_tar_bio.sh, modules/objectives.py",
                         "--retain_representations; weight 1 in obj_model_mse_representations"),
        ReferenceSetting("defense_args.tasks_per_step", 1, RUN_TAR_BIO,
                         "--tar_num_tasks_sampled"),
        ReferenceSetting("defense_args.adversary_batch_size", 4, RUN_TAR_BIO,
                         "--tar_adversary_batch_size"),
        ReferenceSetting("defense_args.tr_batch_size", None, DATALOADERS,
                         "x_tr batches have --batch_size (heldout_dataloader); null: the "
                         "stage's batch size, the same rule"),
        ReferenceSetting("defense_args.heldout_fraction", 0.2, DATALOADERS,
                         "forget rows held out for x_tr (train_test_split test_size=0.20)"),
        ReferenceSetting("alignment.train.method", "full", "tar.py",
                         "every weight (FSDP); hftlab's CPU protocol trains a LoRA"),
        ReferenceSetting("alignment.train.lr", 2e-5, RUN_TAR_BIO,
                         "--lr for every weight of an 8B model; the protocol configs calibrate "
                         "a LoRA on the 135M model. alignment.train is shared by TAR and its "
                         "SFT start (keyed as sft's)"),
        ReferenceSetting("alignment.train.schedule", "schedule-free, 32 warmup steps",
                         "run_tar_bio.sh, tar.py", "--warmup_steps 32, AdamWScheduleFree"),
        ReferenceSetting("alignment.train.weight_decay", 0.0, "tar.py",
                         "AdamWScheduleFree's default (none passed); cpu_sst2_ref.yaml keeps "
                         "the git-disl alignment's 0.1 for every defense"),
        ReferenceSetting("alignment.train.max_steps", 750, RUN_TAR_BIO,
                         "--max_steps (outer steps); the protocol configs train epochs (over "
                         "the retain rows here)"),
        ReferenceSetting("alignment.train.batch_size", 8, RUN_TAR_BIO,
                         "--batch_size; cpu_sst2_ref.yaml keeps the git-disl alignment's 10"),
        ReferenceSetting("alignment.train.grad_accum", 1, RUN_TAR_BIO,
                         "--gradient_accumulation_steps"),
        ReferenceSetting("alignment.train.max_length", 256, DATALOADERS, "cutoff_len=256"),
        ReferenceSetting("alignment.train.max_grad_norm", 0.0, "modules/training.py",
                         "tar_training_loop never clips"),
    )

    @dataclass
    class Options:
        start: str = "sft"  # sft: train on the plain SFT alignment (safeguarded start) | base
        retain_data: DataSpec | None = field(  # x_r rows; None: the alignment (refusal) rows
            default_factory=lambda: DataSpec(kind="refusal", path=RETAIN_PATH, offset=400, n=200)
        )
        inner_steps: int = 64  # K, simulated attack steps (run_tar_bio.sh: 64)
        adversary_lrs: list[float] = field(
            default_factory=lambda: [2e-6, 2e-5, 4e-5]  # --adversary_lr_samples (bio)
        )
        tr_every: int = 4  # TR gradient every n attack steps (--tar_inner_loop_subsample 4)
        tr_loss: str = "entropy"  # reference max_entropy; dpo is rejected (see docstring)
        tamper_weight: float = 4.0  # --tar_tamper_resistance_grad_scale; 0: no attack at all
        weighting: str = "schedule"  # schedule: exp(λ(i-K+1)) (--use_weighting_schedule)
        schedule_lambda: float = 0.0625  # λ (--schedule_lambda)
        retain_weight: float = 1.0  # --tar_retain_scale; 0: no retain gradient
        representation_weight: float = 1.0  # D (--retain_representations); 0: not computed
        tasks_per_step: int = 1  # attacks sampled per outer step (--tar_num_tasks_sampled)
        adversary_batch_size: int = 4  # --tar_adversary_batch_size
        tr_batch_size: int | None = None  # x_tr batch; None: the stage's batch size
        heldout_fraction: float = 0.2  # harmful rows kept for x_tr (meta split, 20 %)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options

        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"defense_args.{key} of 'tar' {message}")

        if o.start not in STARTS:
            raise bad("start", f"'{o.start}' must be one of {', '.join(STARTS)}")
        if o.tr_loss == "dpo":
            raise bad(
                "tr_loss",
                "'dpo' is not supported: the reference's DPO variant needs a refusal and a "
                "harmful answer to the same prompt, and hftlab's alignment refusals and "
                "provider_harmful answers are different prompts; use 'entropy'",
            )
        if o.tr_loss not in TR_LOSSES:
            raise bad("tr_loss", f"'{o.tr_loss}' must be one of {', '.join(TR_LOSSES)}")
        if o.weighting not in WEIGHTINGS:
            raise bad("weighting", f"'{o.weighting}' must be one of {', '.join(WEIGHTINGS)}")
        for key in ("inner_steps", "tr_every", "tasks_per_step", "adversary_batch_size"):
            if getattr(o, key) < 1:
                raise bad(key, "must be >= 1")
        if o.tr_batch_size is not None and o.tr_batch_size < 1:
            raise bad("tr_batch_size", "must be >= 1 (or null: the stage's batch size)")
        if not o.adversary_lrs or any(lr <= 0 for lr in o.adversary_lrs):
            raise bad("adversary_lrs", "must be a non-empty list of learning rates > 0")
        for key in ("tamper_weight", "retain_weight", "representation_weight"):
            if getattr(o, key) < 0:
                raise bad(key, "must be >= 0 (0 switches the term off)")
        if not 0 < o.heldout_fraction < 1:
            raise bad("heldout_fraction", "must be in (0, 1)")
        self.adversary: Batches | None = None
        self.heldout: Batches | None = None
        self.frozen: torch.nn.Module | None = None  # full fine-tuning only
        self.rng = random.Random(0)
        self.trace: list[dict[str, float]] = []

    def alignment_start(self) -> str:
        return self.options.start

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        """The stage's rows are the benign retain rows (``retain_data``) when given: the
        reference's outer loop draws x_r from its retain set; the refusal rows train the SFT
        start instead. One ConfigError when they cannot be loaded (no ``data_root``...)."""
        spec = self.options.retain_data
        if stage != ALIGNMENT or spec is None:
            return examples
        try:
            return ctx.load(spec)
        except DataError as exc:
            raise ConfigError(
                "defense_args.retain_data of 'tar' (its benign retain rows) cannot be loaded: "
                f"{str(exc).rstrip('.')}. Or give other benign answered rows (retain_data: "
                "{kind: ..., path: ...}), or retain_data: null to retain on the alignment rows"
            ) from exc

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != ALIGNMENT:
            return
        o = self.options
        stream = provider_harmful_stream(trainer, o.adversary_batch_size, self.name)
        items = list(stream.items)
        if len(items) < 2:
            raise ConfigError(
                "defense 'tar' needs at least 2 provider_harmful rows (one held out for the "
                f"tamper-resistance loss), got {len(items)}: raise provider_harmful.n"
            )
        random.Random(trainer.seed + 2).shuffle(items)
        n_held = min(len(items) - 1, max(1, round(o.heldout_fraction * len(items))))
        device = trainer.device
        self.heldout = BatchStream(items[:n_held], o.tr_batch_size or trainer.cfg.batch_size,
                                   trainer.pad_id, device, trainer.seed + 3)
        self.adversary = BatchStream(items[n_held:], o.adversary_batch_size, trainer.pad_id,
                                     device, trainer.seed + 1)
        self.rng = random.Random(trainer.seed)
        self.trace = []
        uses_start = o.representation_weight > 0 and o.retain_weight > 0
        self.frozen = frozen_copy_if_full(trainer) if uses_start else None

    def start_hidden_states(self, trainer: SFTTrainer, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Hidden states of the model the stage started from (adapters off, or the copy)."""
        with stage_start_model(trainer, self.frozen) as start, trainer.autocast():
            body, _ = causal_lm_parts(start)
            out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True)
        return tuple(h.detach() for h in out.hidden_states)

    def retain_loss(self, trainer: SFTTrainer, batch: Batch) -> tuple[torch.Tensor, dict]:
        """CE(w; x_r) + representation_weight · D(w; x_r) (before retain_weight)."""
        rep = self.options.representation_weight
        with trainer.autocast():
            logits, targets, out = supervised_logits(trainer.model, batch,
                                                     output_hidden_states=rep > 0)
            ce = F.cross_entropy(logits, targets)
        stats = {"loss": float(ce.detach())}
        if rep == 0:
            return ce, stats
        distance = representation_distance(out.hidden_states,
                                           self.start_hidden_states(trainer, batch),
                                           batch.attention_mask)
        stats["representation_distance"] = float(distance.detach())
        return ce + rep * distance, stats

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        assert self.adversary is not None and self.heldout is not None
        o = self.options
        params = trainer.trainable_parameters()
        tamper = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        attack: dict[str, float] = {}
        with trainer.extra_passes(params) as passes:
            if o.tamper_weight > 0:  # 0: the term is off, no attack is simulated
                weights = tamper_weights(o.inner_steps, o.tr_every, o.tamper_weight,
                                         o.weighting, o.schedule_lambda, o.tasks_per_step)
                for _ in range(o.tasks_per_step):
                    heldout = self.heldout.next()
                    lr = self.rng.choice(o.adversary_lrs)
                    grads, attack = tamper_resistance_gradient(
                        trainer, params, self.adversary, heldout, o.inner_steps, lr, weights
                    )
                    for acc, g in zip(tamper, grads):
                        acc.add_(g)
            if o.retain_weight > 0:
                loss, stats = self.retain_loss(trainer, batch)
                trainer.backward(o.retain_weight * loss)
                stats["retain_loss"] = float(loss.detach())
            else:  # the term is off: one no-grad forward, only for the logged loss
                with torch.no_grad(), trainer.autocast():
                    logits, targets, _ = supervised_logits(trainer.model, batch)
                stats = {"loss": float(F.cross_entropy(logits, targets))}
            passes.add(tamper, 1.0 / trainer.cfg.grad_accum)
        stats.update(attack)
        self.trace.append(stats)
        return stats

    def report(self, stage: str) -> dict[str, object]:
        """Diagnostics of the simulated attack (its last sampled attack per micro-batch),
        averaged over the first and last tenth of the stage: TAR works when the attacked
        model's harmful loss and entropy on the held-out batch rise over the stage, and the
        distance to the start on the retain rows stays small."""
        if stage != ALIGNMENT or not self.trace:
            return {}
        keys = ("harmful_loss_after_attack", "harmful_entropy_after_attack",
                "adversary_loss_last", "attack_shift", "loss", "representation_distance")
        return first_last_means([{k: r[k] for k in keys if k in r} for r in self.trace])
