"""Helpers shared by the model-based judges: device and dtype, model locations, labelled data
and agreement metrics (``hftlab judge eval``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError

if TYPE_CHECKING:
    import torch

    from hftlab.data.records import Example
    from hftlab.judges.base import Judge

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_choice(judge: str, option: str, value: str, allowed: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` is one of ``allowed`` (``cuda:1`` counts as ``cuda``)."""
    if value.split(":")[0] not in allowed:
        raise ConfigError(f"option '{option}' of judge '{judge}' is {value!r}; choose one of "
                          f"{', '.join(allowed)}")


def resolve_device(setting: str) -> torch.device:
    """``auto``: the device the run itself uses (accelerate's choice: this process's GPU, else
    the CPU), so the judge sits next to the model it scores."""
    import torch

    if setting != "auto":
        return torch.device(setting)
    from accelerate import PartialState

    return PartialState().device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the run computes in bf16 (see ``hftlab.context.resolve_precision``),
    else fp32."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    from hftlab.devices import resolve_precision

    return torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32


def model_source(judge: str, model: str) -> str:
    """A local folder (made absolute, so that describe() names it exactly) or a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"judge '{judge}': model folder {path} has no config.json")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"judge '{judge}': model folder {model!r} does not exist")
    return model


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """``out`` may be written: it does not exist, is empty, or is an earlier ``what`` folder
    (it holds ``marker``), which is replaced; anything else is never overwritten."""
    if out.exists() and (not out.is_dir()
                         or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ConfigError(f"{out} exists and is not {what} folder; give a new folder (an "
                          f"existing {what.split(' ', 1)[1]} folder is replaced)")


def unloadable(judge: str, model: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"judge '{judge}' could not load {model!r} ({type(exc).__name__}: {exc}); give a local "
        "model folder, or a hub id reachable from this machine (option 'model')"
    )


# ------------------------------------------------------------------------- labelled data

LABELLED_FIELDS = "prompt, response, and harmful (true/false) or is_safe (true/false)"


def load_pretrained(
    judge: str, source: str, revision: str | None, dtype: str, device_setting: str,
    model_class: Any, **tokenizer_options: Any,
) -> tuple[Any, Any, torch.device]:
    """(tokenizer, model, device) of a model judge: one clear ConfigError if it cannot load."""
    from transformers import AutoTokenizer

    device = resolve_device(device_setting)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, **tokenizer_options)
        model = model_class.from_pretrained(
            source, revision=revision, dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as exc:
        raise unloadable(judge, source, exc) from exc
    return tokenizer, model, device


def load_labelled(source: str, data_root: Path | None = None) -> list[Example]:
    """Labelled (prompt, response, harmful) rows from a data spec or a plain file.

    ``source`` is either an inline data spec as YAML (``{kind: beavertails, path: ...}``; the
    label is the loader's ``is_harmful``), or the path of a file (``.jsonl``, ``.json``,
    ``.csv``...) whose rows have :data:`LABELLED_FIELDS`.
    """
    from hftlab.config import ConfigError, build, load_yaml
    from hftlab.data.loaders import load_examples
    from hftlab.data.spec import DataSpec

    if not source.lstrip().startswith("{"):
        return _labelled_file(source, data_root)
    raw = load_yaml(source, f"data spec {source!r}", lines=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"data spec {source!r} is not a mapping; write it as "
                          "'{kind: beavertails, path: FILE}'")
    spec = build(DataSpec, raw, where=f"data spec {source!r}", prefix="")
    return load_examples(spec, data_root)


def _labelled_file(path_text: str, data_root: Path | None) -> list[Example]:
    from hftlab.data.loaders.core import resolve_path
    from hftlab.data.loaders.readers import _bool, _fail, _read_records, _text
    from hftlab.data.records import Example

    path = resolve_path(path_text, data_root)
    source = str(path)
    out = []
    for rec in _read_records(path, source):
        if not isinstance(rec.fields, dict):
            raise _fail(source, rec.where, f"expected a mapping with {LABELLED_FIELDS}")
        prompt = _text(rec, source, "prompt", LABELLED_FIELDS)
        response = _text(rec, source, "response", LABELLED_FIELDS, required=False)
        if rec.fields.get("harmful") is not None:
            harmful = _bool(rec, source, "harmful", LABELLED_FIELDS)
        elif rec.fields.get("is_safe") is not None:
            harmful = not _bool(rec, source, "is_safe", LABELLED_FIELDS)
        else:
            raise _fail(source, rec.where, f"missing label (expected fields: {LABELLED_FIELDS})")
        out.append(Example(prompt=prompt, response=response, is_harmful=harmful, source=source,
                           row=rec.row))
    return out


# ------------------------------------------------------------------------------- metrics


def classification_metrics(labels: list[bool], predictions: list[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 of the harmful class, and Cohen's kappa (agreement
    beyond chance) of the predictions with the labels, from ``sklearn.metrics``. A ratio with
    nothing to divide is 0 (no predicted or no actual harmful row); with no rows accuracy is
    NaN; where both sides hold one class only, agreement is total and kappa is 1."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    n = len(labels)
    if not n:
        return {"n": 0, "harmful": 0, "accuracy": math.nan, "precision": 0.0, "recall": 0.0,
                "f1": 0.0, "kappa": 0.0, "tp": 0, "fp": 0, "tn": 0, "fn": 0}
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    y, p = np.asarray(labels, dtype=bool), np.asarray(predictions, dtype=bool)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, p, labels=[False, True]).ravel())
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, p, labels=[True], average=None, zero_division=0.0)
    if (y == y[0]).all() and (p == y[0]).all():
        kappa = 1.0  # chance agreement 1 (one class only, the same on both sides): 0/0
    else:
        kappa = float(cohen_kappa_score(y, p, labels=[False, True]))
    return {
        "n": n, "harmful": tp + fn, "accuracy": float(accuracy_score(y, p)),
        "precision": float(precision[0]), "recall": float(recall[0]), "f1": float(f1[0]),
        "kappa": kappa, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def evaluate_judge(judge: Judge, examples: list[Example]) -> dict[str, Any]:
    """The judge's verdicts on labelled rows against their labels (``is_harmful``)."""
    flags = judge.flag([e.prompt for e in examples], [e.response for e in examples])
    if len(flags) != len(examples):
        raise ValueError(f"judge '{judge.name}' returned {len(flags)} verdicts for "
                         f"{len(examples)} rows")
    return classification_metrics([e.is_harmful for e in examples], [bool(f) for f in flags])
