"""How an upload becomes a run's fine-tuning data: the data kind ``service_upload`` reads the
job's stored rows, and the attack ``service_upload`` takes exactly those rows as the user's
data set (no sampling, no task instruction added: the tenant's rows are trained as given).
Registered when a worker imports this module; a job's run config sets
``attack: service_upload`` and ``finetune.harmful_data: {kind: service_upload, path: ...}``
(the slot whose rows reach the attack verbatim; they are not marked harmful)."""

from __future__ import annotations

import json
from pathlib import Path

from hftlab.attacks import ATTACKS, Attack, AttackInputs
from hftlab.data.loaders import DataError, DataSpec, Example, register_loader, resolve_path

KIND = "service_upload"


def load_service_upload(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """The rows of a job's stored upload (JSONL of prompt, response, flagged)."""
    if not spec.path:
        raise DataError(f"data kind {KIND!r} needs the path of the job's stored upload")
    path = resolve_path(spec.path, data_root)
    out = []
    for row, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        out.append(Example(prompt=record["prompt"], response=record["response"],
                           source=str(path), row=row,
                           meta={"flagged": bool(record.get("flagged"))}))
    return out


class ServiceUpload(Attack):
    """The tenant's upload, every row as given, in a fixed shuffled order (the seed's)."""

    summary = "the service tenant's upload, every row verbatim (hftlab serve)"

    def build(self, inputs: AttackInputs) -> list[Example]:
        import random

        rows = [e.replace(is_harmful=False) for e in inputs.harmful]
        random.Random(inputs.seed).shuffle(rows)
        return rows


def register() -> None:
    """Register the kind and the attack once per process."""
    from hftlab.data.loaders import LOADERS

    if KIND not in LOADERS:
        register_loader(KIND)(load_service_upload)
    if KIND not in ATTACKS:
        ATTACKS.register(KIND)(ServiceUpload)
