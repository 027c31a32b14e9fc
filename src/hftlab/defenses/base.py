"""Defense interface: one hook per pipeline stage, each a no-op by default.

Stages are ``"alignment"`` (the provider's safety training), ``"finetune"`` (the user's job)
and the post-fine-tuning repair. A defense overrides only the hooks of the stages it acts in
and lists those stages in ``stages`` (the alignment cache key includes the defense only when it
acts there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from hftlab.data.records import Example
from hftlab.registry import Plugin, Registry

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.train import Batch, SFTTrainer

ALIGNMENT, FINETUNE, POST_FINETUNE = "alignment", "finetune", "post_finetune"


class Defense(Plugin):
    stages: ClassVar[tuple[str, ...]] = ()
    needs_provider_harmful: ClassVar[bool] = False  # reads the config's provider_harmful set
    needs_alignment_data: ClassVar[bool] = False  # trains on alignment.data after alignment

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        """Change a training set before a stage (e.g. mix in safety data)."""
        return examples

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        """Called once when a training stage starts (after the optimizer exists)."""

    def loss(self, stage: str, trainer: SFTTrainer, batch: Batch) -> torch.Tensor:
        """The training objective of one micro-batch; plain SFT cross-entropy by default."""
        return trainer.compute_loss(batch)

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        """Forward and backward for one micro-batch; gradients are left in ``.grad`` for the
        trainer's optimizer step. Override for multi-pass updates (perturbations, meta-steps)."""
        loss = self.loss(stage, trainer, batch)
        trainer.backward(loss)
        return {"loss": float(loss.detach())}

    def report(self, stage: str) -> dict[str, Any]:
        """What the defense wants recorded about a stage ("data", "alignment", "finetune",
        "post_finetune"): it goes into that stage's stage.json as ``defense_report``."""
        return {}

    def inference_system_prompt(self, system_prompt: str | None) -> str | None:
        """The system prompt the deployed model is served with (e.g. a secret trigger)."""
        return system_prompt

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        """Repair the fine-tuned model before deployment. ``model`` is the aligned model with
        the user's fine-tuning: PEFT-wrapped and unmerged under LoRA (return it with edited
        adapter weights and the adapter is saved), plain under full fine-tuning."""
        return model

    def cache_key(self, stage: str) -> dict[str, Any] | None:
        """What of this defense determines the output of ``stage`` (None: it does not act)."""
        if stage not in self.stages:
            return None
        return {"defense": self.name, "options": self.options_dict()}


DEFENSES: Registry[Defense] = Registry("defense")
