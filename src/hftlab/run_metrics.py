"""The schema of ``metrics.json``: :class:`RunMetrics`, nested typed blocks with a
``schema_version``.

Version 2 (written now) nests each evaluated model's scores in its own block (``final``,
``aligned``, ``base``, ``finetuned``) and the data counts under ``data``. Version 1 (the files
without ``schema_version``) held the same values under flat dotted keys (``aligned.harmful_score``)
beside nested blocks; it still loads, through the one table :data:`V1_PATHS`.

The v1 names are also the metric names ``hftlab compare --metrics`` and its column headers use,
so a :class:`RunMetrics` reads as a mapping from them (``metrics["aligned.harmful_score"]``)
besides its attributes (``metrics.aligned.harmful_score``). Imports nothing heavy: reading
records must not need torch."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 2
T = TypeVar("T")


class MetricsSchemaError(ValueError):
    """A metrics.json this version of hftlab cannot read."""


def _known(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls`` from the keys of ``data`` that are its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def _without_none(block: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(block).items() if v is not None}


@dataclass
class Scores:
    """One evaluated model's scores, in percent of the evaluation prompts."""

    harmful_score: float | None = None
    finetune_accuracy: float | None = None
    over_refusal: float | None = None  # refusals of harmless prompts, when configured
    # classification tasks: the harmful score with harmful prompts answered by a bare task label
    # counted as harmless (the keyword judge flags them: no refusal phrase)
    harmful_score_without_task_labels: float | None = None
    # task prompts answered with a refusal phrase (keyword judge's phrases)
    task_refusal: float | None = None


@dataclass
class FinalScores(Scores):
    """The deployed model's scores with sample sizes, 95% Wilson intervals and diagnostics."""

    harmful_score_ci95: list[float] | None = None
    finetune_accuracy_ci95: list[float] | None = None
    over_refusal_ci95: list[float] | None = None
    n_eval_harmful: int | None = None
    n_eval_task: int | None = None
    n_eval_harmless: int | None = None
    empty_harmful_completions: int | None = None
    harmful_score_empty_as_harmless: float | None = None
    # classification tasks: harmful prompts answered with a bare task label
    task_label_harmful_completions: int | None = None


@dataclass
class Repair:
    """A post-fine-tuning repair: the change it made (its before is ``RunMetrics.finetuned``)."""

    harmful_score_change: float | None = None
    finetune_accuracy_change: float | None = None
    report: dict[str, Any] = field(default_factory=dict)  # the defense's own report


@dataclass
class VariantScore:
    """An attack's extra evaluation of the deployed model (e.g. backdoor: with its trigger)."""

    harmful_score: float | None = None
    n: int | None = None
    ci95: list[float] | None = None
    rewritten_completions: int | None = None  # absent in evaluations made before it was counted


@dataclass
class StageTiming:
    """Cost of one stage; the training stages add their training time and step time."""

    seconds: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    peak_rss_mb: float | None = None  # the process's peak host memory up to this stage's end
    peak_gpu_mb: float | None = None  # this stage's own accelerator peak (GPU runs)
    train_seconds: float | None = None
    train_tokens: int | None = None
    seconds_per_step: float | None = None
    cached: bool | None = None  # the stage's model came from the cache
    skipped: str | None = None  # why fine-tuning did not run (no uploaded row left)
    machine: str | None = None  # CPU, cores, torch threads, bf16, GPUs (devices.machine_label)
    other_cores: float | None = None  # cores other processes kept busy meanwhile, on average
    contended: bool | None = None  # that load took cores this run's threads needed


@dataclass
class CurvePoint:
    """Held-out losses of the model being fine-tuned at one optimizer step."""

    step: int = 0
    train_loss: float | None = None
    task_loss: float | None = None
    alignment_loss: float | None = None
    harmful_loss: float | None = None


@dataclass
class Drift:
    """Mean L2 distance between aligned and fine-tuned hidden states, per layer and mean."""

    per_layer: list[float] = field(default_factory=list)
    mean: float | None = None


@dataclass
class JudgeInfo:
    """The judge's name and its own description (version, path, phrase list hash)."""

    name: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> JudgeInfo:
        data = dict(data or {})
        return cls(data.pop("name", None), data)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.details}


@dataclass
class AttackInfo:
    """The attack's name, the user's rows and harmful rows, and its own report."""

    name: str | None = None
    n: int | None = None
    n_harmful: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # options, row counts, screens

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AttackInfo:
        data = dict(data or {})
        return cls(data.pop("attack", None), data.pop("n", None), data.pop("n_harmful", None),
                   data)

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.name, **self.details, "n": self.n, "n_harmful": self.n_harmful}


@dataclass
class DataSummary:
    counts: dict[str, int] = field(default_factory=dict)
    # what the defense did to the upload (guardrail: rows screened, dropped, leaked)
    defense_report: dict[str, Any] | None = None
    overlaps: dict[str, int] = field(default_factory=dict)


_FINAL = ("harmful_score", "harmful_score_ci95", "finetune_accuracy", "finetune_accuracy_ci95",
          "over_refusal", "over_refusal_ci95", "n_eval_harmful", "n_eval_task",
          "n_eval_harmless", "empty_harmful_completions", "harmful_score_empty_as_harmless",
          "task_label_harmful_completions", "harmful_score_without_task_labels", "task_refusal")
_SAME = ("task", "defense", "model", "seed", "precision", "device", "judge", "versions",
         "attack", "attack_eval", "attack_serving", "curves", "drift", "stages",
         "alpaca_eval_outputs")
# every v1 key (also a metric name of `hftlab compare`) → its path in the v2 file
V1_PATHS: dict[str, str] = {
    **{key: f"final.{key}" for key in _FINAL},
    **{f"{model}.{key}": f"{model}.{key}" for model, keys in (
        ("aligned", ("harmful_score", "finetune_accuracy", "over_refusal", "task_refusal")),
        ("base", ("harmful_score", "finetune_accuracy", "task_refusal")),
        ("finetuned", ("harmful_score", "finetune_accuracy", "task_refusal"))) for key in keys},
    "data_counts": "data.counts", "data_defense_report": "data.defense_report",
    "overlaps": "data.overlaps",
    **{key: key for key in _SAME},
}


def lookup(data: Any, name: str) -> Any:
    """``data[name]``, else the dotted path ``name`` into nested mappings; None when absent."""
    if isinstance(data, Mapping) and name in data:
        return data[name]
    for part in name.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    return data


def _upgrade_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    new: dict[str, Any] = {}
    for key, path in V1_PATHS.items():
        if key not in old:
            continue
        *parents, last = path.split(".")
        node = new
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = old[key]
    repair = old.get("repair")
    if repair:  # v1 kept the scores before the repair twice: here and as finetuned.*
        before = new.setdefault("finetuned", {})
        for key in ("harmful_score", "finetune_accuracy"):
            if before.get(key) is None:
                before[key] = repair.get(f"before.{key}")
        new["repair"] = {k: v for k, v in repair.items() if not k.startswith("before.")}
    return new


def _scores(data: Mapping[str, Any] | None) -> Scores | None:
    """A model's block; None for a model that was not evaluated (every value None)."""
    if not data or all(v is None for v in data.values()):
        return None
    return _known(Scores, data)


@dataclass(eq=True)
class RunMetrics(Mapping[str, Any]):
    """What a finished run reports: the content of its ``metrics.json``."""

    task: str | None = None
    defense: str | None = None
    model: str | None = None
    seed: int | None = None
    precision: str | None = None
    # the fine-tuning stage's, when finetune.precision made it differ from ``precision``
    finetune_precision: str | None = None
    device: str | None = None
    judge: JudgeInfo = field(default_factory=JudgeInfo)
    final: FinalScores = field(default_factory=FinalScores)  # the deployed model
    aligned: Scores = field(default_factory=Scores)  # before fine-tuning
    base: Scores | None = None  # the original model, when evaluated
    finetuned: Scores | None = None  # before a post-fine-tuning repair, when one ran
    repair: Repair | None = None
    attack: AttackInfo = field(default_factory=AttackInfo)
    attack_eval: dict[str, VariantScore] | None = None
    attack_serving: dict[str, Any] | None = None  # how the attacker queries the deployed model
    data: DataSummary = field(default_factory=DataSummary)
    curves: list[CurvePoint] = field(default_factory=list)
    drift: Drift | None = None
    stages: dict[str, StageTiming] = field(default_factory=dict)
    alpaca_eval_outputs: str | None = None  # a run folder's relative path, when generated
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunMetrics:
        """Any schema version up to :data:`SCHEMA_VERSION` (v1: no ``schema_version`` key)."""
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise MetricsSchemaError(f"schema_version {version!r} is not a version number")
        if version > SCHEMA_VERSION:
            raise MetricsSchemaError(
                f"schema_version {version} is newer than this hftlab reads (up to "
                f"{SCHEMA_VERSION}); upgrade hftlab to read it")
        d = _upgrade_v1(data) if version == 1 else data
        drift, repair, variants = d.get("drift"), d.get("repair"), d.get("attack_eval")
        return cls(
            task=d.get("task"), defense=d.get("defense"), model=d.get("model"),
            seed=d.get("seed"), precision=d.get("precision"),
            finetune_precision=d.get("finetune_precision"), device=d.get("device"),
            judge=JudgeInfo.from_dict(d.get("judge")),
            final=_known(FinalScores, d.get("final") or {}),
            aligned=_known(Scores, d.get("aligned") or {}),
            base=_scores(d.get("base")), finetuned=_scores(d.get("finetuned")),
            repair=_known(Repair, repair) if repair else None,
            attack=AttackInfo.from_dict(d.get("attack")),
            attack_eval={k: _known(VariantScore, v) for k, v in variants.items()}
            if variants else None,
            attack_serving=d.get("attack_serving"),
            data=_known(DataSummary, d.get("data") or {}),
            curves=[_known(CurvePoint, p) for p in d.get("curves") or []],
            drift=_known(Drift, drift) if drift else None,
            stages={k: _known(StageTiming, v) for k, v in (d.get("stages") or {}).items()},
            alpaca_eval_outputs=d.get("alpaca_eval_outputs"),
            versions=dict(d.get("versions") or {}),
        )

    @classmethod
    def load(cls, path: Path) -> RunMetrics:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except MetricsSchemaError as exc:
            raise MetricsSchemaError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The v2 ``metrics.json`` (JSON types only)."""
        def block(value: Any) -> Any:
            return None if value is None else dataclasses.asdict(value)

        return {
            "schema_version": self.schema_version,
            "task": self.task, "defense": self.defense, "model": self.model, "seed": self.seed,
            "precision": self.precision,
            **({"finetune_precision": self.finetune_precision}
               if self.finetune_precision else {}),
            "device": self.device,
            "judge": self.judge.to_dict(),
            "final": block(self.final), "aligned": block(self.aligned), "base": block(self.base),
            "finetuned": block(self.finetuned), "repair": block(self.repair),
            "attack": self.attack.to_dict(),
            "attack_eval": None if self.attack_eval is None else
            {k: _without_none(v) for k, v in self.attack_eval.items()},
            "attack_serving": self.attack_serving,
            "data": block(self.data),
            "curves": [dataclasses.asdict(p) for p in self.curves],
            "drift": block(self.drift),
            "stages": {k: _without_none(t) for k, t in self.stages.items()},
            "alpaca_eval_outputs": self.alpaca_eval_outputs,
            "versions": self.versions,
        }

    def as_v1(self) -> dict[str, Any]:
        """The values under their v1 keys, the metric names of ``hftlab compare``."""
        new = self.to_dict()
        old = {key: lookup(new, path) for key, path in V1_PATHS.items()}
        old["repair"] = None if self.repair is None else {
            "before.harmful_score": old["finetuned.harmful_score"],
            "before.finetune_accuracy": old["finetuned.finetune_accuracy"],
            **new["repair"]}
        return old

    def value(self, name: str) -> Any:
        """A metric by name: a v1 key or a dotted path under one (``attack_eval.triggered.
        harmful_score``, ``stages.finetune.seconds``), or a path into the v2 file
        (``final.n_eval_task``); None when absent."""
        found = lookup(self.as_v1(), name)
        return lookup(self.to_dict(), name) if found is None else found

    def __getitem__(self, name: str) -> Any:
        view = self.as_v1()
        if name not in view:
            raise KeyError(name)
        return view[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_v1())

    def __len__(self) -> int:
        return len(self.as_v1())
