"""Speeds measured in run records, for ``hftlab plan``: plain SFT's seconds per token in each
stage, each defense's cost relative to SFT's, tokens per row, and fixed seconds (data, repairs).

A stage's timing names the machine it ran on (``stages.<stage>.machine``: CPU, cores, torch
threads, bf16, GPUs). A defense's relative cost is taken between runs of one machine wherever
the records hold sft runs of that machine, so a defense timed on a slower CPU or with fewer
threads is compared with sft timed alike; otherwise (records made before the label existed) its
median over every record is set against sft's. Load from other work on the same machine is not
in the label; a stage's timing says how many cores other processes kept busy meanwhile and
whether that took cores the run needed (``contended``). A contended timing is left out wherever
the records time the same defense and stage without contention; a stage timed only under load
is read against sft's timings under load where the records hold some.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftlab.attacks import ATTACKS
from hftlab.config import ConfigError, load_config
from hftlab.defenses import DEFENSES
from hftlab.defenses.base import FINETUNE

TRAIN_STAGES = ("align", "finetune")
#: Parameters of the models the configs name (by a part of the name).
PARAMETERS = {"llama-2-7b": 6.74e9, "llama-3-8b": 8.03e9, "llama-3.1-8b": 8.03e9,
              "embedded": 1.35e8, "smollm2-135m": 1.35e8}


@dataclass
class Rates:
    """Speeds measured in the run records of one precision."""

    precision: str
    records: int
    seconds_per_token: dict[str, float]  # per training stage, plain sft
    eval_seconds_per_budget: float  # per prompt × max new tokens, plain sft
    factor: dict[tuple[str, str], float]  # (defense, stage) → its cost / sft's
    # (defense, stage) → seconds (data, repairs); ("attack:NAME", "search") → an attack's search
    fixed_seconds: dict[tuple[str, str], float]
    tokens_per_row: dict[tuple[str, str], float]  # (defense or "*", stage) → tokens per row
    stage_tokens: dict[tuple[str, str], float]  # (defense or "*", stage) → tokens (rows unknown)
    reuses_finetune: set[str] = field(default_factory=set)  # defenses that skip fine-tuning
    parameters: float = 1.35e8  # of the records' model: speeds scale by the inverse
    # plain sft's seconds per token at the other precision (bf16 <-> fp32), for a fine-tuning
    # run in it (finetune.precision); empty when no record measured that precision
    other_seconds_per_token: dict[str, float] = field(default_factory=dict)
    pooled_stages: set[str] = field(default_factory=set)  # sft untimed: all records' median
    paired: int = 0  # (defense, stage) costs read against sft's runs on the same machine
    left_out: int = 0  # contended timings set aside for uncontended ones of the same stage
    under_load: int = 0  # (defense, stage) costs timed only under load


@dataclass
class Samples:
    """What the records measured, before the medians: seconds per token per (defense, stage)
    and the machine that timed them (None: a record that names none)."""

    eval_counts: dict[str, float]  # the evaluations' median prompt counts (eval_budget's)
    by_machine: dict[tuple[str, str], dict[str | None, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    per_row: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    fixed: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    finetuned: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    # timings taken while other work took cores the run needed, kept apart until settle()
    contended: dict[tuple[str, str], dict[str | None, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    under_load: set[tuple[str, str]] = field(default_factory=set)  # timed only contended
    left_out: int = 0  # contended timings set aside, each counted once

    def add_speed(self, key: tuple[str, str], info: dict, seconds_per_token: float) -> None:
        by = self.contended if info.get("contended") else self.by_machine
        by[key][info.get("machine")].append(seconds_per_token)

    def settle(self) -> None:
        """A stage's contended timings stand in only where it has no other. Those left out are
        counted under the defense's bare name, which files every timing once."""
        for key, by in self.contended.items():
            if key not in self.by_machine:
                self.by_machine[key] = by
                self.under_load.add(key)
            elif "{" not in key[0]:
                self.left_out += sum(len(values) for values in by.values())

    def sft(self, key: tuple[str, str]) -> dict[str | None, list[float]]:
        """sft's timings to read a (defense, stage) against: those made under load for a
        stage timed only under load, where there are some."""
        loaded = self.contended.get(("sft", key[1]))
        if key in self.under_load and loaded:
            return loaded
        return self.by_machine.get(("sft", key[1]), {})

    def per_token(self) -> dict[tuple[str, str], list[float]]:
        """Every record's seconds per token per (defense, stage), whatever its machine."""
        return {key: [v for values in by.values() for v in values]
                for key, by in self.by_machine.items()}


def eval_budget(config: Any, counts: dict[str, float]) -> float:
    """Prompt × new-token slots of one evaluation (all prompts when the config says n: null)."""
    harmful = config.eval.harmful.n or counts.get("eval_harmful", 300)
    task = (config.eval.task.n or counts.get("eval_task", 872)) if config.eval.task else 0
    return harmful * config.eval.max_new_tokens + task * config.eval.task_max_new_tokens


def train_rows(config: Any, stage: str) -> float:
    """Rows a training stage steps through: n × epochs, or max_steps × batch when it stops
    early."""
    part = config.alignment if stage == "align" else config.finetune
    n = part.data.n if stage == "align" else part.n
    rows = (n or 0) * part.train.epochs
    if part.train.max_steps:
        rows = min(rows, part.train.max_steps * part.train.batch_size) if rows else (
            part.train.max_steps * part.train.batch_size)
    return float(rows)


def read_records(folder: Path) -> list[tuple[dict, Any]]:
    """(metrics, config) of every run record below ``folder``."""
    found = []
    for path in sorted(folder.rglob("metrics.json")):
        config_path = path.parent / "config.yaml"
        if not config_path.exists():
            continue
        try:
            metrics = json.loads(path.read_text())
            config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in
                                        yaml.safe_load(config_path.read_text()).items()])
        except (OSError, ValueError, ConfigError):
            continue  # a record of an older config format: not needed for the speeds
        if metrics.get("stages"):
            found.append((metrics, config))
    return found


def names(config: Any) -> list[str]:
    """The keys a run's speeds are filed under: its defense with its options, and the defense
    alone (the fallback for options no record measured)."""
    label = f"{config.defense}{json.dumps(config.defense_args, sort_keys=True)}"
    return [label, config.defense] if config.defense_args else [config.defense]


def lookup(table: dict, config: Any, stage: str, default: float | None) -> float | None:
    for name in names(config):
        if (name, stage) in table:
            return table[(name, stage)]
    return default


def search_key(attack: str) -> tuple[str, str]:
    """Where an attack's search seconds are filed among the fixed seconds."""
    return (f"attack:{attack}", "search")


def attack_search(metrics: dict) -> float | None:
    """The seconds a record's attack spent in its search (``search`` in the attack's report),
    when this run ran it: None when it read the result from the cache, when its attack has no
    search, or for a record made before attacks timed theirs. The search runs before the stages
    (the data are built and checked before the run folder changes), so no stage's seconds hold
    it; a search is priced once per problem, for the first of the runs that share it."""
    search = (metrics.get("attack") or {}).get("search")
    if not isinstance(search, dict) or search.get("cached") or search.get("seconds") is None:
        return None
    return float(search["seconds"])


def add_record(defense: str, stages: dict, config: Any, samples: Samples) -> None:
    per_row = samples.per_row
    for stage in TRAIN_STAGES:
        info = stages.get(stage) or {}
        if stage == "finetune":
            samples.finetuned[defense].append(not info.get("cached"))
        if info.get("cached") or not info.get("tokens"):
            continue
        samples.add_speed((defense, stage), info, info["seconds"] / info["tokens"])
        per_row[(defense, f"{stage}:tokens")].append(info["tokens"])
        if defense == config.defense:
            per_row[("*", f"{stage}:tokens")].append(info["tokens"])
        rows = train_rows(config, stage)
        if rows:
            per_row[(defense, stage)].append(info["tokens"] / rows)
            if defense == config.defense:  # once per record
                per_row[("*", stage)].append(info["tokens"] / rows)
    if "data" in stages:
        samples.fixed[(defense, "data")].append(stages["data"].get("seconds", 0.0))
    samples.fixed[(defense, "post_finetune")].append(
        (stages.get("post_finetune") or {}).get("seconds", 0.0))
    evaluation = stages.get("eval") or {}
    if evaluation.get("seconds") and (stages.get("align") or {}).get("cached", True):
        budget = eval_budget(config, samples.eval_counts)
        samples.add_speed((defense, "eval"), evaluation, evaluation["seconds"] / budget)


def paired_cost(samples: Samples, key: tuple[str, str]) -> float | None:
    """A defense's seconds per token in a stage over plain sft's on the same machine: the median
    over the machines that timed both (each machine's medians); None when none did."""
    sft = samples.sft(key)
    paired = [statistics.median(values) / statistics.median(sft[machine])
              for machine, values in samples.by_machine[key].items()
              if machine is not None and sft.get(machine)]
    return statistics.median(paired) if paired else None


def sft_median(samples: Samples, key: tuple[str, str], base: float) -> float:
    """sft's median seconds per token to set a defense's against when no machine pairs them:
    ``base``, or sft's median under load for a stage timed only under load."""
    if key in samples.under_load and samples.contended.get(("sft", key[1])):
        return statistics.median(v for values in samples.contended[("sft", key[1])].values()
                                 for v in values)
    return base


def measure(folder: Path, precision: str) -> Rates:
    """Median speeds of the records at ``precision``, and each defense's cost relative to sft;
    a defense measured only at the other precision takes its relative cost from there (the
    extra passes a defense makes cost the same share in either)."""
    # a run whose fine-tuning computed in another precision (finetune.precision) times neither
    found = [(m, c) for m, c in read_records(folder) if not m.get("finetune_precision")]
    rates = measure_records([(m, c) for m, c in found if m.get("precision") == precision],
                            folder, precision)
    other = [(m, c) for m, c in found if m.get("precision") != precision]
    try:
        fallback = measure_records(other, folder, "other")
    except ConfigError:
        return rates
    for table in ("factor", "fixed_seconds", "tokens_per_row", "stage_tokens"):
        mine, theirs = getattr(rates, table), getattr(fallback, table)
        measured = {name for name, _ in mine}
        mine.update({key: value for key, value in theirs.items() if key[0] not in measured})
    rates.reuses_finetune |= {d for d in fallback.reuses_finetune
                              if d not in {n for n, _ in rates.factor}}
    rates.other_seconds_per_token = fallback.seconds_per_token
    return rates


def measure_records(records: list[tuple[dict, Any]], folder: Path, precision: str) -> Rates:
    if not records:
        raise ConfigError(f"no run records at {precision} below {folder}; give --records or "
                          "--precision fp32|bf16")
    counts: dict[str, list[float]] = defaultdict(list)
    for metrics, _ in records:
        # the evaluation's prompt counts: data.counts (metrics.json v2), data_counts (v1)
        found = (metrics.get("data") or {}).get("counts") or metrics.get("data_counts") or {}
        for key in ("eval_harmful", "eval_task"):
            if found.get(key):
                counts[key].append(found[key])
    samples = Samples({key: statistics.median(values) for key, values in counts.items()})
    for metrics, config in records:
        stages = metrics["stages"]
        # whether the attack searches does not depend on the alignment: none is named here
        if ATTACKS.get(config.attack).search_problem(config, "") is not None:
            if (search := attack_search(metrics)) is not None:
                samples.fixed[search_key(config.attack)].append(search)
            if "search" not in (metrics.get("attack") or {}):
                # a record older than the search's timing, whose data stage may hold the search
                stages = {k: v for k, v in stages.items() if k != "data"}
        for defense in names(config):
            add_record(defense, stages, config, samples)
    samples.settle()
    per_token, per_row = samples.per_token(), samples.per_row
    median = {key: statistics.median(values) for key, values in per_token.items()}
    paired = {key: cost for key in median if (cost := paired_cost(samples, key)) is not None}
    base = {stage: median.get(("sft", stage)) for stage in (*TRAIN_STAGES, "eval")}
    pooled_stages = {stage for stage, value in base.items() if value is None}
    for stage, value in base.items():
        if value is None:  # no plain sft record of this stage: the median of every defense
            pooled = [v for (d, s), vs in per_token.items() if s == stage for v in vs]
            if not pooled:
                raise ConfigError(f"no record below {folder} at {precision} measures the "
                                  f"{stage} stage")
            base[stage] = statistics.median(pooled)
    return Rates(
        precision=precision, records=len(records),
        parameters=statistics.median(parameters(str(c.model.name), 1.35e8) for _, c in records),
        seconds_per_token={s: base[s] for s in TRAIN_STAGES},
        eval_seconds_per_budget=base["eval"],
        # sft's own cost is 1 by definition; a defense's, paired by machine where the records allow
        factor={key: paired.get(key, value / sft_median(samples, key, base[key[1]]))
                for key, value in median.items()},
        fixed_seconds={key: statistics.median(v) for key, v in samples.fixed.items()},
        tokens_per_row={key: statistics.median(v) for key, v in per_row.items()
                        if not key[1].endswith(":tokens")},
        stage_tokens={(d, s.split(":")[0]): statistics.median(v) for (d, s), v in per_row.items()
                      if s.endswith(":tokens")},
        reuses_finetune={d for d, ran in samples.finetuned.items()
                         if not any(ran) and not shapes_finetuning(d)},
        pooled_stages=pooled_stages,
        paired=sum(key[0] != "sft" for key in paired),
        left_out=samples.left_out,
        under_load=sum(d != "sft" and "{" not in d for d, _ in samples.under_load),
    )


def shapes_finetuning(name: str) -> bool:
    """Whether a defense (a records name: bare or with its options) acts in the fine-tuning
    stage. Only a defense that does not can reuse sft's fine-tuning; one that does (a guardrail
    that screened nothing out) may have found its fine-tuning in the cache by chance."""
    return FINETUNE in DEFENSES.get(name.split("{")[0]).stages


def parameters(model_name: str, unknown: float = 7e9) -> float:
    """The model's parameter count from its name; ``unknown`` for a name not in the table."""
    lowered = model_name.lower()
    return next((count for part, count in PARAMETERS.items() if part in lowered), unknown)
