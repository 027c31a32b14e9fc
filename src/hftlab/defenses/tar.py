"""TAR: tamper-resistant safeguards by first-order meta-learning (Tamirisa et al. 2024,
arXiv 2408.00761).

TAR trains the aligned model so that a fine-tuning attack *from* it cannot bring the harmful
behaviour back. Each outer step (one micro-batch of alignment data here) does:

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
   retain_weight · ∇ [CE(w; x_r) + representation_weight · D(w; x_r)] on the alignment batch
   x_r, where D is the hidden-state distance to the frozen model: the mean over all hidden
   states (embedding output and every block, as ``output_hidden_states`` returns them) of the
   mean over tokens of ‖h − h_frozen‖₂;
5. the trainer clips and steps with ITS optimizer on g_TR + g_retain. The adversary's optimizer
   is a separate object, discarded after the attack; the weights the trainer sees are w.

L_TR (``tr_loss: entropy``) is the reference's ``max_entropy`` objective: minus the mean
entropy of the next-token distribution of the attacked model on x_tr, so the outer step raises
the entropy the attacked model has on harmful answers (``entropy_loss``).

Follows rishub-tamirisa/tamper-resistance ``modules/training.py`` (``tar_training_loop``,
``inner_loop_step``, ``tamper_resistance_obj``, ``schedule``), ``modules/objectives.py``
(``max_entropy_loss``, ``obj_model_mse_representations``) and the defaults of ``run_tar_bio.sh``
/ ``tar.py``: K = 64 (``--tar_inner_loop_steps``), adversary lrs {2e-6, 2e-5, 4e-5}
(``--adversary_lr_samples``), TR gradient every 4 steps (``--tar_inner_loop_subsample``),
tamper weight 4.0 (``--tar_tamper_resistance_grad_scale``), exponential weighting with
λ = 0.0625 (``--use_weighting_schedule --schedule_lambda``), retain weight 1.0
(``--tar_retain_scale``) with the representation term on (``--retain_representations``, weight
1 inside ``obj_model_mse_representations``), one sampled attack per outer step
(``--tar_num_tasks_sampled 1``), adversary batch size 4 (``--tar_adversary_batch_size``), x_tr
with the stage's batch size from a held-out 20 % of the harmful data (the ``meta`` loader, a
``test_size=0.20`` split), TR loss never bounded (``--unbounded``).

Data: the adversary and x_tr both come from the provider's harmful QA (``provider_harmful``),
split once, by a seeded shuffle, into a disjoint held-out part (``heldout_fraction``) for x_tr
and the rest for the adversary. The retain batch is the alignment (refusal) batch.

CPU preset: ``CPU_PRESET`` = ``{inner_steps: 4, tr_every: 2}`` (pass it as ``defense_args``);
every other option keeps the reference value. A reference outer step costs about
K + K / tr_every + 1.3 ≈ 81 forward-backward passes (81× plain SFT); the preset about 7.3×.
With K = 4 the schedule's weights sum to less than with K = 64 (1.9 vs 4.4), so the
tamper-resistance term is relatively weaker than the reference's.

Departures from the reference, and why:

- ``tr_loss: dpo`` (the reference's refusal-training variant, ``run_tar_dpo.sh``) needs a
  refusal and a harmful answer for the SAME prompt plus a DPO reference model. hftlab's
  alignment refusals and the provider's harmful QA are different prompts (e.g. Safety-Tuned
  LLaMAs vs BeaverTails), so no pairs exist; ``dpo`` is rejected with a ConfigError and the
  reference's default ``max_entropy`` (bio, cyber) is implemented.
- The entropy is taken at the supervised (answer) positions of x_tr, and D over the real
  (non-padding) tokens; the reference's raw-text batches average over every position,
  padding included. The reference's retain CE is over raw text; here it is the alignment CE.
- The adversary always fine-tunes on harmful QA; the reference also samples adversaries that
  first train on benign retain text and switch to forget data at a Beta(6, 3)-drawn step
  (``retain_forget_switch``); the alignment stage has no benign task data to do that with.
- The outer optimizer is the trainer's (AdamW with the stage's lr and schedule); the
  reference uses schedule-free AdamW (lr 2e-5, 32 warmup steps).
- The frozen model of D is the model the stage starts from: the same network with the LoRA
  adapters disabled, or (full fine-tuning) a frozen copy made at ``setup``; the reference
  loads a separate checkpoint (``--retain_model_name``).
- Each micro-batch runs its own attack and contributes 1/grad_accum of its gradient, so
  ``grad_accum`` > 1 averages that many sampled attacks (the reference splits each adversary
  step into grad_accum micro-batches instead); gradients of earlier micro-batches are kept.
- With fewer inner steps than ``tr_every`` the TR gradient is taken once, after the last
  step (the reference would take none and train on the retain loss alone).

Returned per micro-batch: ``loss`` is the alignment cross-entropy CE(w; x_r), comparable with
the other defenses' curves; ``retain_loss`` adds the representation term; the other keys are
diagnostics of the simulated attack.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from hftlab.config import ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense
from hftlab.defenses.common import (
    BatchStream,
    first_last_means,
    global_norm,
    provider_harmful_stream,
    take_grads,
)
from hftlab.model import causal_lm_parts, is_peft
from hftlab.train import supervised_logits

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

TR_LOSSES = ("entropy",)
WEIGHTINGS = ("schedule", "uniform")
ADVERSARY_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, as the reference's inner optimizer
CPU_PRESET: dict[str, Any] = {"inner_steps": 4, "tr_every": 2}


class Batches(Protocol):
    def next(self) -> Batch: ...


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mean entropy of softmax(logits) over the leading positions (reference
    ``max_entropy_loss``): minimising it makes the predictions more uniform."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return -entropy.mean()


def tamper_weights(
    inner_steps: int, tr_every: int, tamper_weight: float, weighting: str,
    schedule_lambda: float, tasks: int = 1,
) -> dict[int, float]:
    """{inner step i (0-based, after i + 1 adversary updates): weight of ∇L_TR there}, as the
    reference's ``meta_grad_scale = grad_scale · schedule(i, K, λ) / num_tasks`` at the steps
    with (i + 1) % subsample == 0 (the last step when ``tr_every`` > K)."""
    every = min(tr_every, inner_steps)
    weights = {}
    for i in range(inner_steps):
        if (i + 1) % every:
            continue
        if weighting == "schedule":
            s = math.exp(schedule_lambda * (i - (inner_steps - 1)))
        else:
            s = 1.0 / inner_steps
        weights[i] = tamper_weight * s / tasks
    return weights


def tamper_resistance_gradient(
    trainer: SFTTrainer,
    params: list[torch.nn.Parameter],
    adversary: Batches,
    heldout: Batch,
    steps: int,
    lr: float,
    weights: dict[int, float],
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Simulate ``steps`` AdamW steps of a fine-tuning attack on ``adversary`` batches from the
    current weights and return Σ_i weights[i] · ∇ entropy_loss(w_i; heldout) per parameter
    (float32), first order. The weights are restored exactly and every ``.grad`` is None when
    this returns (the caller's gradients must be saved first)."""
    model = trainer.model
    backward = trainer.accelerator.backward
    saved = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=ADVERSARY_WEIGHT_DECAY)
    stats = {"adversary_lr": lr, "tamper_resistance_loss": 0.0}
    try:
        for p in params:
            p.grad = None
        for i in range(steps):
            loss = trainer.compute_loss(adversary.next())
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == 0:
                stats["adversary_loss_first"] = float(loss.detach())
            stats["adversary_loss_last"] = float(loss.detach())
            if i not in weights:
                continue
            with trainer.autocast():
                logits, targets, _ = supervised_logits(model, heldout)
            tr = entropy_loss(logits)
            backward(weights[i] * tr)
            with torch.no_grad():
                for acc, p in zip(total, params):
                    if p.grad is not None:
                        acc.add_(p.grad.float())
                    p.grad = None
            stats["tamper_resistance_loss"] += weights[i] * float(tr.detach())
            stats["harmful_entropy_after_attack"] = -float(tr.detach())
            stats["harmful_loss_after_attack"] = float(
                F.cross_entropy(logits.detach(), targets)
            )
        with torch.no_grad():
            stats["attack_shift"] = float(
                global_norm([p.detach() - s for p, s in zip(params, saved)])
            )
    finally:
        optimizer.state.clear()
        del optimizer
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None
    return total, stats


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


@DEFENSES.register("tar")
class TAR(Defense):
    summary = (
        "alignment stage: meta-learn resistance to simulated fine-tuning attacks "
        "(max-entropy on harmful data after K AdamW attack steps, plus retain loss)"
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
    resume_attributes = ("adversary", "heldout", "rng", "trace")
    needs_provider_harmful = True

    @dataclass
    class Options:
        inner_steps: int = 64  # K, simulated attack steps (run_tar_bio.sh: 64)
        adversary_lrs: list[float] = field(
            default_factory=lambda: [2e-6, 2e-5, 4e-5]  # --adversary_lr_samples (bio)
        )
        tr_every: int = 4  # TR gradient every n attack steps (--tar_inner_loop_subsample 4)
        tr_loss: str = "entropy"  # reference max_entropy; dpo is rejected (see docstring)
        tamper_weight: float = 4.0  # --tar_tamper_resistance_grad_scale
        weighting: str = "schedule"  # schedule: exp(λ(i-K+1)) (--use_weighting_schedule)
        schedule_lambda: float = 0.0625  # λ (--schedule_lambda)
        retain_weight: float = 1.0  # --tar_retain_scale
        representation_weight: float = 1.0  # hidden-state distance (--retain_representations)
        tasks_per_step: int = 1  # attacks sampled per outer step (--tar_num_tasks_sampled)
        adversary_batch_size: int = 4  # --tar_adversary_batch_size
        tr_batch_size: int | None = None  # x_tr batch; None: the stage's batch size
        heldout_fraction: float = 0.2  # harmful rows kept for x_tr (meta split, 20 %)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options

        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"defense_args.{key} of 'tar' {message}")

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
                raise bad(key, "must be >= 0")
        if not 0 < o.heldout_fraction < 1:
            raise bad("heldout_fraction", "must be in (0, 1)")
        self.adversary: Batches | None = None
        self.heldout: Batches | None = None
        self.frozen: torch.nn.Module | None = None  # full fine-tuning only
        self.rng = random.Random(0)
        self.trace: list[dict[str, float]] = []

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
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.frozen = None
        if o.representation_weight > 0 and not is_peft(model):
            self.frozen = copy.deepcopy(model).eval()
            self.frozen.requires_grad_(False)

    def frozen_hidden_states(self, trainer: SFTTrainer, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Hidden states of the model the stage started from (adapters off, or the copy)."""
        if self.frozen is not None:
            model, off = self.frozen, nullcontext()
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            off = model.disable_adapter()
        body, _ = causal_lm_parts(model)
        with torch.no_grad(), trainer.autocast(), off:
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
                                           self.frozen_hidden_states(trainer, batch),
                                           batch.attention_mask)
        stats["representation_distance"] = float(distance.detach())
        return ce + rep * distance, stats

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        assert self.adversary is not None and self.heldout is not None
        o = self.options
        params = trainer.trainable_parameters()
        earlier = take_grads(params)  # earlier micro-batches of this optimizer step
        weights = tamper_weights(o.inner_steps, o.tr_every, o.tamper_weight, o.weighting,
                                 o.schedule_lambda, o.tasks_per_step)
        tamper = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        attack: dict[str, float] = {}
        for _ in range(o.tasks_per_step):
            heldout = self.heldout.next()
            lr = self.rng.choice(o.adversary_lrs)
            grads, attack = tamper_resistance_gradient(
                trainer, params, self.adversary, heldout, o.inner_steps, lr, weights
            )
            for acc, g in zip(tamper, grads):
                acc.add_(g)
        loss, stats = self.retain_loss(trainer, batch)
        trainer.backward(o.retain_weight * loss)
        scale = 1.0 / trainer.cfg.grad_accum
        with torch.no_grad():
            for p, before, extra in zip(params, earlier, tamper):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = before + grad + (scale * extra).to(p.dtype)
        stats["retain_loss"] = float(loss.detach())
        stats.update(attack)
        self.trace.append(stats)
        return stats

    def report(self, stage: str) -> dict[str, object]:
        """Diagnostics of the simulated attack (its last sampled attack per micro-batch),
        averaged over the first and last tenth of the stage: TAR works when the attacked
        model's harmful loss and entropy on the held-out batch rise over the stage."""
        if stage != ALIGNMENT or not self.trace:
            return {}
        keys = ("harmful_loss_after_attack", "harmful_entropy_after_attack",
                "adversary_loss_last", "attack_shift", "loss")
        return first_last_means([{k: r[k] for k in keys if k in r} for r in self.trace])
