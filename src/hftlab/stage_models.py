"""The models a run's stages produce, loaded back from the run folder and the caches: the
aligned model, the user's fine-tuned model and the model the provider deploys."""

from __future__ import annotations

from pathlib import Path

import torch

from hftlab.context import RunContext
from hftlab.model import load_trained


def aligned_model(ctx: RunContext, full_training: bool = False) -> torch.nn.Module:
    """The base model with the alignment stage's checkpoint loaded (merged), or the base model
    itself when alignment is disabled; ``full_training``: fp32 weights (full fine-tuning)."""
    base = ctx.base_model(full_training)
    info = ctx.stage_info("align")
    if not info.get("cache"):
        return base
    return load_trained(base, Path(info["cache"]) / "model")


def finetuned_model(ctx: RunContext) -> torch.nn.Module:
    """Aligned model plus the user's fine-tuning (still PEFT-wrapped for LoRA, unmerged); the
    aligned model itself when the fine-tuning was skipped (nothing left of the upload)."""
    model = aligned_model(ctx)
    if ctx.stage_info("finetune").get("skipped"):
        return model
    folder = ctx.stage_dir("finetune") / "model"
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    return load_trained(model, folder)


def deployed_model(ctx: RunContext) -> torch.nn.Module:
    """What the provider serves: the post-fine-tuning output if a repair ran, else the
    fine-tuned model, merged."""
    folder = ctx.stage_dir("post_finetune") / "model"
    if folder.exists():
        return load_trained(aligned_model(ctx), folder)
    model = finetuned_model(ctx)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


