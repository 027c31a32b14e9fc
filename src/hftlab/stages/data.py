"""The data stage: the user's fine-tuning upload as the run's attack built it and its defense
screened it, saved to ``data/user_data.jsonl`` (``is_harmful`` per row), with the split counts
and fingerprints. The finetune stage trains on that file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.stages import MARKER, USER_DATA, Stage
from hftlab.utils import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from hftlab.context import RunContext


@dataclass(frozen=True)
class DataOutputs:
    """What the data stage hands on: the rows the user uploaded (after the defense's screening).
    The stage is not cached: it is rebuilt from the config in every run."""

    user: list[Example]

    def key(self) -> str:
        """The fingerprint of the rows, as the finetune key holds it."""
        return data_fingerprint(self.user)


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Build and save the user's fine-tuning data and the split counts."""
    data = ctx.data
    outputs = DataOutputs(data.user)
    if ctx.is_main:
        write_jsonl(ctx.stage_dir(Stage.DATA) / USER_DATA, [e.to_dict() for e in outputs.user])
    return {
        "attack": {**ctx.attack.describe(data.user), **ctx.attack.data_report(ctx)},
        "counts": {
            "alignment": len(data.alignment),
            "user": len(data.user),
            "user_harmful": sum(e.is_harmful for e in data.user),
            "mechanisms_alignment": len(data.mech_alignment),
            "mechanisms_harmful": len(data.mech_harmful),
            "eval_harmful": len(data.eval_harmful),
            "eval_task": len(data.eval_task),
            "provider_harmful": len(data.provider_harmful),
        },
        "overlaps": data.overlaps,
        "defense_report": ctx.defense.report("data"),
        "fingerprints": {
            "alignment": data_fingerprint(data.alignment),
            "user": outputs.key(),
        },
    }


def user_rows(ctx: RunContext) -> list[Example]:
    """The rows the fine-tuning trains on: the data stage's saved file once that stage has
    finished, else (keys computed before a run, e.g. a sweep's grouping) the same rows built
    in memory."""
    folder = ctx.stage_dir(Stage.DATA)
    if (folder / MARKER).exists():
        return [Example.from_dict(r) for r in read_jsonl(folder / USER_DATA)]
    return ctx.data.user
