"""The models a run's stages produce, loaded back from the run folder and the caches: the
aligned model, the user's fine-tuned model and the model the provider deploys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hftlab.model import load_trained
from hftlab.stages import Stage

if TYPE_CHECKING:
    from hftlab.context import RunContext


def aligned_model(ctx: RunContext, full_training: bool = False, precision: str | None = None
                  ) -> torch.nn.Module:
    """The base model with the alignment stage's checkpoint loaded (merged), or the base model
    itself when alignment is disabled; ``full_training``: fp32 weights (full fine-tuning);
    ``precision``: the weights stored for it (the run's when None)."""
    base = ctx.base_model(full_training, precision)
    info = ctx.stage_info(Stage.ALIGN)
    if not info.get("cache"):
        return base
    # a defense that trained on the plain SFT alignment (TAR): base → SFT merged → its own
    if info.get("starts_from"):
        base = load_trained(base, Path(info["starts_from"]) / "model")
    return load_trained(base, Path(info["cache"]) / "model")


def aligned_adapter_model(ctx: RunContext, precision: str | None = None) -> torch.nn.Module:
    """The base model with the alignment LoRA attached unmerged and trainable, for a defense
    whose fine-tuning keeps training that adapter (Panacea's ``single_lora``); ``precision``:
    the base weights stored for it (the run's when None)."""
    from peft import PeftModel

    info = ctx.stage_info(Stage.ALIGN)
    if not info.get("cache"):
        raise ValueError("no alignment adapter to continue: the alignment stage is disabled")
    return PeftModel.from_pretrained(ctx.base_model(precision=precision),
                                     str(Path(info["cache"]) / "model"),
                                     is_trainable=True)


def finetune_start_model(ctx: RunContext) -> torch.nn.Module:
    """What the fine-tuning stage's saved weights apply to: the aligned model, or the base
    model when fine-tuning continued the alignment adapter (its saved adapter holds both)."""
    if ctx.stage_info(Stage.FINETUNE).get("continues_alignment_adapter"):
        return ctx.base_model()
    return aligned_model(ctx)


def finetuned_model(ctx: RunContext) -> torch.nn.Module:
    """Aligned model plus the user's fine-tuning (still PEFT-wrapped for LoRA, unmerged); the
    aligned model itself when the fine-tuning was skipped (nothing left of the upload)."""
    if ctx.stage_info(Stage.FINETUNE).get("skipped"):
        return aligned_model(ctx)
    model = finetune_start_model(ctx)
    folder = ctx.stage_dir(Stage.FINETUNE) / "model"
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    return load_trained(model, folder)


def deployed_model(ctx: RunContext) -> torch.nn.Module:
    """What the provider serves: the post-fine-tuning output if a repair ran, else the
    fine-tuned model, merged."""
    folder = ctx.stage_dir(Stage.REPAIR) / "model"
    if folder.exists():
        return load_trained(finetune_start_model(ctx), folder)
    model = finetuned_model(ctx)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


