"""The repair stage (folder ``post_finetune``): the provider's repair of the fine-tuned model
(SafeLoRA, Antidote, ...), saved as the deployed model; the fine-tuned model is kept when the
run's defense does not act here. Not cached: its output lives in the run folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.model import save_trained
from hftlab.stage_models import finetuned_model
from hftlab.stages import Stage
from hftlab.utils import atomic_dir

if TYPE_CHECKING:
    from hftlab.context import RunContext


@dataclass(frozen=True)
class RepairOutputs:
    """What the stage records in its stage.json (``repaired``: a deployed model was saved)."""

    repaired: bool
    defense: str | None = None
    skipped: str | None = None
    defense_report: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def stage_repair(ctx: RunContext) -> dict[str, Any]:
    if Stage.REPAIR.hook not in ctx.defense.stages:
        return RepairOutputs(repaired=False).info()
    if ctx.stage_info(Stage.FINETUNE).get("skipped"):
        return RepairOutputs(False, skipped="fine-tuning was skipped: nothing to repair").info()
    model = ctx.defense.post_finetune(finetuned_model(ctx), ctx)
    if ctx.is_main:
        with atomic_dir(ctx.stage_dir(Stage.REPAIR) / "model") as tmp:
            save_trained(model, tmp)
    return RepairOutputs(True, defense=ctx.defense.name,
                         defense_report=ctx.defense.report(Stage.REPAIR.hook)).info()
