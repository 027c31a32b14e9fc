"""T-Vaccine: targeted, layer-wise Vaccine (Liu et al. 2024, arXiv 2410.09760).

Vaccine perturbs every layer's hidden states; T-Vaccine perturbs (and trains) only the layers
that matter for safety, chosen by how strongly the harmful loss reacts to them. Per optimizer
step t of the alignment stage:

- every K steps (``probability_steps``): one harmful batch (the reference samples batch size 1)
  forward/backward; p_l ∝ ‖∂L_harm/∂h_l‖₂ with h_l the output of block l's self-attention;
- every J steps (``interval_steps``): draw S layers from p without replacement;
- the LoRA weights of the unselected layers' *attention* modules are frozen (no gradient, so the
  optimizer leaves them untouched), and Vaccine's perturbation ε_l = ρ · g_l / ‖g‖ is applied at
  the sampled layers' attention outputs only (one norm over the sampled layers).

Follows Lslland/T-Vaccine ``trainer.py`` (``BaseTrainer.training_step``,
``switch_active_layers``, ``after_gradient_magnitude_step``, ``unfreeze_activate_layers``) and
``script/alignment/T-Vaccine.sh``: ρ = 3, S = 8 of 32 layers (scaled to depth: S = round(L/4),
at least 1), J = 20, K = 200, 200 harmful rows for scoring (``prompt_data_size``).

What is frozen: the reference's layer list is the attention modules
(``get_leaf_modules_with_grad``), and ``unfreeze_activate_layers`` sets ``requires_grad`` on the
parameters of those modules only: the LoRA of the selected attention modules trains, that of the
other attention modules is frozen, and everything outside attention is left as PEFT made it, so
the MLP adapters of every layer (its LoRA targets all 7 linear layers) train at every step.
``train_scope: attention`` (default) does that. ``train_scope: block`` freezes whole decoder
blocks instead (the MLP adapters of unselected layers too), as the paper describes training only
the selected layers; it is not what the reference code runs. With q/k/v-only adapters the two
are the same.

Departure: the reference also activates layer i−1 with layer i for models deeper than 26 layers,
a memory trick of its custom modelling code that does not change which layers are perturbed; it
is not reproduced. ``reference_settings`` lists the reference run (its alignment adapter is
hftlab's ``vaccine`` LoRA preset: r 8, α 4, all 7 linear layers, dropout 0.1).

Data: the provider's harmful QA (``provider_harmful``), used only to score the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hftlab.config import ALL_LINEAR, ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense, ReferenceSetting
from hftlab.defenses.common import (
    BatchStream,
    attention_modules,
    decoder_layers,
    provider_harmful_stream,
)
from hftlab.defenses.vaccine import output_gradients, perturbed_step

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

TRAIN_SCOPES = ("attention", "block")
TRAINER = "Lslland/T-Vaccine trainer.py"
ALIGN_SCRIPT = "Lslland/T-Vaccine script/alignment/T-Vaccine.sh"
FINETUNE_SCRIPT = "Lslland/T-Vaccine script/tvaccine_finetune/sst2.sh"
TRAIN_PY = "Lslland/T-Vaccine train.py"


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
    reference = "Lslland/T-Vaccine trainer.py (BaseTrainer), script/alignment/T-Vaccine.sh"
    stages = (ALIGNMENT,)
    multi_process = "its layer sampling reads gradient norms that are not reduced across processes"
    resume_attributes = ("harmful", "probabilities", "active", "rng", "_prepared_step", "history")
    needs_provider_harmful = True

    @dataclass
    class Options:
        rho: float = 3.0  # perturbation radius (reference: 3)
        active_layers: int | None = None  # S; None = round(L/4) (reference 8 of 32)
        interval_steps: int = 20  # J: re-sample the layers every J steps (reference: 20)
        probability_steps: int = 200  # K: re-score the layers every K steps (reference: 200)
        harmful_batch_size: int = 1  # reference scoring dataloader batch size
        # attention: freeze the unselected layers' attention LoRA only (reference);
        # block: freeze the unselected layers' whole blocks (see the module docstring)
        train_scope: str = "attention"

    reference_settings = (
        ReferenceSetting("defense_args.rho", 3.0, "Lslland/T-Vaccine README.md",
                         "bash T-Vaccine.sh 3 (RHO=$1)"),
        ReferenceSetting("defense_args.active_layers", 8, ALIGN_SCRIPT,
                         "lisa_activated_layers=8 of 32 (Llama-2-7B); None = round(L/4)"),
        ReferenceSetting("defense_args.interval_steps", 20, ALIGN_SCRIPT, "lisa_interval_steps"),
        ReferenceSetting("defense_args.probability_steps", 200, ALIGN_SCRIPT),
        ReferenceSetting("defense_args.harmful_batch_size", 1, TRAINER,
                         "BaseTrainer.get_dataloader: batch_size 1"),
        ReferenceSetting("defense_args.train_scope", "attention", TRAINER,
                         "unfreeze_activate_layers: LoRA of the selected attention modules"),
        ReferenceSetting("provider_harmful.n", 200, ALIGN_SCRIPT,
                         "prompt_data_size=200: first 200 unsafe rows of "
                         "beavertails_with_refusals_train.json"),
        ReferenceSetting("alignment.data.n", 2000, TRAIN_PY,
                         "BeaverTails_safe_alignment: first 2000 refusals"),
        ReferenceSetting("alignment.train.lr", 1e-3, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.epochs", 20, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.batch_size", 10, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.weight_decay", 0.1, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.warmup_ratio", 0.1, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.schedule", "cosine", ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.max_length", 200, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.lora.r", 8, TRAIN_PY, "LORA_PRESETS 'vaccine'"),
        ReferenceSetting("alignment.train.lora.alpha", 4, TRAIN_PY),
        ReferenceSetting("alignment.train.lora.dropout", 0.1, TRAIN_PY),
        ReferenceSetting("alignment.train.lora.target_modules", ALL_LINEAR, TRAIN_PY),
        ReferenceSetting("finetune.train.lr", 1e-5, FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.epochs", 20, FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.batch_size", 10, FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.weight_decay", 0.1, FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.warmup_ratio", 0.1, FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.schedule", "cosine", FINETUNE_SCRIPT),
        ReferenceSetting("finetune.train.lora.r", 8, TRAIN_PY),
        ReferenceSetting("finetune.train.lora.alpha", 1, TRAIN_PY,
                         "lora_alpha 1 (0.5 for GSM8K): scale 0.125"),
        ReferenceSetting("finetune.train.lora.dropout", 0.1, TRAIN_PY),
        ReferenceSetting("finetune.train.lora.target_modules", ALL_LINEAR, TRAIN_PY),
        ReferenceSetting("finetune.n", 1000, "Lslland/T-Vaccine README.md",
                         "bash sst2.sh 3 0.1 1000"),
        ReferenceSetting("finetune.poison_ratio", 0.1, "Lslland/T-Vaccine README.md"),
    )

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
