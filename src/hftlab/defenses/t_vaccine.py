"""T-Vaccine: targeted, layer-wise Vaccine (Liu et al. 2024, arXiv 2410.09760).

Vaccine perturbs every layer's hidden states; T-Vaccine perturbs (and trains) only the layers
that matter for safety, chosen by how strongly the harmful loss reacts to them. Per optimizer
step t of the alignment stage:

- every K steps (``probability_steps``): one harmful batch (the reference samples batch size 1)
  forward/backward; p_l ∝ ‖∂L_harm/∂h_l‖₂ with h_l the output of block l's self-attention;
- every J steps (``interval_steps``): draw S layers from p without replacement;
- only the sampled layers are trained (every other layer's parameters get no gradient, so the
  optimizer leaves them untouched) and Vaccine's perturbation ε_l = ρ · g_l / ‖g‖ is applied at
  the sampled layers only (one norm over the sampled layers).

Follows Lslland/T-Vaccine ``trainer.py`` (``BaseTrainer.training_step``,
``switch_active_layers``, ``after_gradient_magnitude_step``, ``unfreeze_activate_layers``):
ρ = 3, S = 8 of 32 layers (scaled to depth: S = round(L/4), at least 1), J = 20, K = 200.
Departures: the reference unfreezes the LoRA weights inside the selected *attention* modules
only; with LoRA on every linear layer (the reference's default targets) that leaves the MLP
adapters of unselected layers training, which contradicts the paper's "only the selected layers
are updated". ``train_scope: block`` (default) freezes whole blocks; ``train_scope: attention``
reproduces the reference trainer. The reference also activates layer i−1 with layer i for models
deeper than 26 layers, a memory trick of its custom modelling code that does not change which
layers are perturbed; it is not reproduced.

Data: the provider's harmful QA (``provider_harmful``), used only to score the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense
from hftlab.defenses.common import (
    BatchStream,
    attention_modules,
    decoder_layers,
    provider_harmful_stream,
)
from hftlab.defenses.vaccine import output_gradients, perturbed_step

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

TRAIN_SCOPES = ("block", "attention")


def layer_probabilities(grads: list[torch.Tensor | None]) -> np.ndarray:
    """p_l = ‖g_l‖₂ / Σ_k ‖g_k‖₂ (reference ``after_gradient_magnitude_step``)."""
    norms = np.array([float(g.float().norm()) if g is not None else 0.0 for g in grads])
    total = norms.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(len(grads), 1.0 / len(grads))
    return norms / total


def sample_layers(rng: np.random.Generator, probabilities: np.ndarray, count: int) -> list[int]:
    """``count`` distinct layer indices drawn with probabilities ``p``, sorted."""
    count = min(count, int((probabilities > 0).sum()) or len(probabilities))
    chosen = rng.choice(len(probabilities), size=count, replace=False, p=probabilities)
    return sorted(int(i) for i in chosen)


@DEFENSES.register("t_vaccine")
class TVaccine(Defense):
    summary = "alignment stage: Vaccine on safety-critical layers sampled by harmful gradient"
    paper = (
        "Liu et al. 2024, Targeted Vaccine: Safety Alignment for LLMs against Harmful "
        "Fine-Tuning via Layer-wise Perturbation, arXiv 2410.09760"
    )
    reference = "Lslland/T-Vaccine trainer.py (BaseTrainer)"
    stages = (ALIGNMENT,)
    resume_attributes = ("harmful", "probabilities", "active", "rng", "_prepared_step", "history")
    needs_provider_harmful = True

    @dataclass
    class Options:
        rho: float = 3.0  # perturbation radius (reference: 3)
        active_layers: int | None = None  # S; None = round(L/4) (reference 8 of 32)
        interval_steps: int = 20  # J: re-sample the layers every J steps (reference: 20)
        probability_steps: int = 200  # K: re-score the layers every K steps (reference: 200)
        harmful_batch_size: int = 1  # reference scoring dataloader batch size
        train_scope: str = "block"  # block | attention (see the module docstring)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if o.train_scope not in TRAIN_SCOPES:
            raise ConfigError(
                f"defense_args.train_scope '{o.train_scope}' of 't_vaccine' must be one of "
                f"{', '.join(TRAIN_SCOPES)}"
            )
        for key in ("interval_steps", "probability_steps", "harmful_batch_size"):
            if getattr(o, key) < 1:
                raise ConfigError(f"defense_args.{key} of 't_vaccine' must be >= 1")
        if o.active_layers is not None and o.active_layers < 1:
            raise ConfigError("defense_args.active_layers of 't_vaccine' must be >= 1")
        self.harmful: BatchStream | None = None
        self.attention: list[torch.nn.Module] = []
        self.layer_params: list[list[torch.nn.Parameter]] = []
        self.probabilities: np.ndarray | None = None
        self.active: list[int] = []
        self.rng = np.random.default_rng(0)
        self._prepared_step = -1
        self.history: list[list[int]] = []  # the sampled layers, one entry per draw

    @property
    def n_active(self) -> int:
        if self.options.active_layers is not None:
            return min(self.options.active_layers, len(self.attention))
        return max(1, round(len(self.attention) / 4))

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != ALIGNMENT:
            return
        self.harmful = provider_harmful_stream(
            trainer, self.options.harmful_batch_size, self.name
        )
        self.attention = attention_modules(trainer.model)
        scopes = self.attention if self.options.train_scope == "attention" else \
            decoder_layers(trainer.model)
        self.layer_params = [[p for p in m.parameters() if p.requires_grad] for m in scopes]
        self.rng = np.random.default_rng(trainer.seed)
        self._prepared_step = -1
        self.history = []

    def score_layers(self, trainer: SFTTrainer) -> None:
        """p ∝ ‖∂L_harm/∂h_l‖ over all layers, every layer's parameters trainable meanwhile."""
        assert self.harmful is not None
        self.set_trainable(range(len(self.layer_params)))
        _, grads = output_gradients(trainer, self.harmful.next(), self.attention)
        self.probabilities = layer_probabilities(grads)

    def set_trainable(self, indices) -> None:
        keep = set(indices)
        for index, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(index in keep)

    def prepare_step(self, trainer: SFTTrainer) -> None:
        step = trainer.step
        if step % self.options.probability_steps == 0 or self.probabilities is None:
            self.score_layers(trainer)
        if step % self.options.interval_steps == 0 or not self.active:
            assert self.probabilities is not None
            self.active = sample_layers(self.rng, self.probabilities, self.n_active)
            self.history.append(self.active)
        self.set_trainable(self.active)

    def report(self, stage: str) -> dict[str, object]:
        if stage != ALIGNMENT or self.probabilities is None:
            return {}
        return {
            "n_layers": len(self.attention),
            "active_layers": self.n_active,
            "last_probabilities": [round(float(p), 4) for p in self.probabilities],
            "sampled_layers": self.history,
        }

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        if self._prepared_step != trainer.step:  # once per optimizer step, not per micro-batch
            self.prepare_step(trainer)
            self._prepared_step = trainer.step
        modules = [self.attention[i] for i in self.active]
        return perturbed_step(trainer, batch, modules, self.options.rho)
