"""``hftlab plan``: what a sweep costs, from measured numbers.

On this CPU: each run's tokens from its config (rows × epochs × tokens per row for the training
stages; prompts × new tokens for the evaluation) times seconds per token measured in the
committed run records (``results/*/*/metrics.json``: per stage seconds and tokens) at the
precision this CPU computes in, times each defense's measured cost relative to plain SFT
(:mod:`hftlab.plan_rates`: between runs of one machine where the records name it). An
alignment shared by several runs is counted once, as the sweep trains it once, and so is an
attack's search (Virus's GCG) that several runs share (the attack caches it per problem); the
GPU estimate leaves the search out.

On GPUs: the same runs at the 7B protocol (``configs/gpu``), from FLOPs and memory bandwidth
with the assumptions printed beside the numbers, and the defenses' measured multipliers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hftlab.attacks import ATTACKS
from hftlab.config import ConfigError, load_config
from hftlab.defenses.base import ALIGNMENT, FINETUNE, POST_FINETUNE
from hftlab.defenses.composite import build_defense
from hftlab.plan_rates import (
    TRAIN_STAGES,
    Rates,
    eval_budget,
    lookup,
    measure,
    names,
    parameters,
    search_key,
    train_rows,
)
from hftlab.sweep import Sweep, load_sweep
from hftlab.utils import stable_hash

__all__ = ["Cell", "cell_seconds", "cpu_cells", "gpu_cells", "measure", "plan_lines"]

#: The 7B protocol the GPU estimate prices each sweep cell at (its grid values on top).
GPU_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpu" / "llama2_7b.yaml"
#: Dense bf16 peak FLOP/s and memory bandwidth (bytes/s), from the vendors' data sheets (SXM).
GPUS = {"h100": {"flops": 989e12, "bandwidth": 3.35e12, "name": "H100 SXM 80GB"},
        "a100": {"flops": 312e12, "bandwidth": 2.04e12, "name": "A100 SXM 80GB"}}
TRAIN_MFU = 0.40  # LoRA training's share of peak FLOP/s (typical for 7B bf16 with HF/PEFT)
DECODE_EFFICIENCY = 0.60  # generation's share of peak bandwidth (weights read once per step)


@dataclass
class Cell:
    name: str
    seconds: dict[str, float]  # per stage
    # stages of its defense, or its attack's search, that no record measured (sft's cost)
    unmeasured: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def default_records() -> Path:
    beside = Path(__file__).resolve().parents[2] / "results"
    return beside if beside.is_dir() else Path("results")


def train_tokens(config: Any, rates: Rates, stage: str) -> float:
    """Tokens a training stage steps through; 0 for a repair that reuses sft's fine-tuning."""
    if stage == "finetune" and any(n in rates.reuses_finetune for n in names(config)):
        return 0.0
    rows = train_rows(config, stage)
    if not rows:  # a mix of sources (n per source): the tokens the records trained on
        return lookup(rates.stage_tokens, config, stage, rates.stage_tokens.get(("*", stage), 0))
    per_row = lookup(rates.tokens_per_row, config, stage,
                     rates.tokens_per_row.get(("*", stage), 0.0))
    return rows * per_row


def cell_seconds(config: Any, rates: Rates, trains_alignment: bool, base_eval: bool,
                 searches: bool = False) -> dict:
    """Seconds per stage of one run on the machine ``rates`` was measured on; ``searches``: this
    run runs its attack's search (the first of the runs that share it)."""
    # another model's size: the speeds scale with the parameters (none known: as measured)
    scale = parameters(str(config.model.name), rates.parameters) / rates.parameters
    # the search runs on the run's model (the surrogate)
    search = scale * rates.fixed_seconds.get(search_key(config.attack), 0.0) * searches
    seconds = {"data": search + lookup(rates.fixed_seconds, config, "data",
                                       rates.fixed_seconds.get(("sft", "data"), 0.0))}
    for stage in TRAIN_STAGES:
        trained = trains_alignment or stage != "align"
        seconds[stage] = trained * scale * (train_tokens(config, rates, stage)
                                    * seconds_per_token(config, rates, stage)
                                    * lookup(rates.factor, config, stage, 1.0))
    seconds["post_finetune"] = lookup(rates.fixed_seconds, config, "post_finetune", 0.0)
    seconds["eval"] = (scale * evaluations(trains_alignment, base_eval) * eval_budget(config, {})
                       * rates.eval_seconds_per_budget * lookup(rates.factor, config, "eval", 1.0))
    return seconds


def seconds_per_token(config: Any, rates: Rates, stage: str) -> float:
    """Plain sft's training seconds per token in ``stage``: a fine-tuning in the other precision
    (``finetune.precision``) at that precision's measured speed, where records measured it."""
    wanted = config.finetune.precision
    if (stage == "finetune" and wanted not in (None, "auto", rates.precision)
            and rates.other_seconds_per_token):
        return rates.other_seconds_per_token[stage]
    return rates.seconds_per_token[stage]


def evaluations(trains_alignment: bool, base_eval: bool) -> int:
    """The fine-tuned model's evaluation, plus the aligned model's (once per alignment) and the
    base model's (once per sweep): each is cached after its first run."""
    return 1 + trains_alignment + base_eval


def alignment_signature(config: Any) -> str:
    """What makes two runs' alignments the same, read from their configs alone (the cache key
    also hashes the data and the model's files, which a plan of a 7B sweep may not reach): the
    alignment settings, their seed, and the defense when it acts in the alignment stage."""
    defense = build_defense(config.defense, config.defense_args)
    acts = ALIGNMENT in defense.stages
    seed = config.seed if config.alignment.seed is None else config.alignment.seed
    return stable_hash([asdict(config.alignment), seed,
                        defense.cache_key(ALIGNMENT) if acts else None])


def search_signature(config: Any) -> str | None:
    """What makes two runs' attack searches the same, read from their configs (the attack's
    ``search_problem``); None for an attack that runs no search."""
    problem = ATTACKS.get(config.attack).search_problem(config, alignment_signature(config))
    return None if problem is None else stable_hash([config.attack, problem])


def first_runs(config_path: Path, overrides: list[list[str]]) -> list[tuple[Any, bool, bool]]:
    """(config, whether this run trains its alignment, whether it runs its attack's search) per
    run: the first run of each alignment and of each search does, from scratch (no cache
    counted); the later ones reuse it."""
    seen: set[str | None] = {None}
    found = []
    for extra in overrides:
        config = load_config(config_path, extra)
        alignment, search = alignment_signature(config), search_signature(config)
        found.append((config, config.alignment.enabled and alignment not in seen,
                      search not in seen))
        seen |= {alignment, search}
    return found


def unmeasured_stages(config: Any, rates: Rates, trains_alignment: bool,
                      searches: bool = False) -> tuple[str, ...]:
    """The stages a run's defense acts in that no record measured for that defense (with or
    without its options): priced as plain sft's, which may be far off (EWC's Fisher, Booster's
    and TAR's extra passes cost several times sft's step); and the attack's search when no
    record timed one (Virus's GCG: priced at nothing, as sft's data stage, which has none)."""
    search = ((f"{config.attack}'s search",)
              if searches and search_key(config.attack) not in rates.fixed_seconds else ())
    if config.defense == "sft":
        return search
    acts = build_defense(config.defense, config.defense_args).stages
    priced = [("align", rates.factor, ALIGNMENT in acts and trains_alignment),
              ("finetune", rates.factor,
               FINETUNE in acts and not any(n in rates.reuses_finetune for n in names(config))),
              ("post_finetune", rates.fixed_seconds, POST_FINETUNE in acts)]
    return tuple(stage for stage, table, needed in priced
                 if needed and lookup(table, config, stage, None) is None) + search


def cpu_cells(sweep: Sweep, rates: Rates) -> list[Cell]:
    """Every run of the sweep on this CPU, from scratch."""
    runs = first_runs(sweep.config, [r.overrides for r in sweep.runs])
    return [Cell(run.name, cell_seconds(config, rates, trains, number == 0, searches),
                 unmeasured_stages(config, rates, trains, searches))
            for number, (run, (config, trains, searches)) in enumerate(zip(sweep.runs, runs))]


def gpu_cells(sweep: Sweep, rates: Rates, gpu: str) -> tuple[list[Cell], float]:
    """The sweep's cells at the 7B protocol on ``gpu``: the grid's values on top of
    :data:`GPU_CONFIG`; returns the cells and the model's parameter count."""
    spec = GPUS[gpu]
    overrides = [[f"{k}={json.dumps(v)}" for k, v in r.values.items()] for r in sweep.runs]
    cells, count = [], 0.0
    for number, (run, (config, trains, _)) in enumerate(
            zip(sweep.runs, first_runs(GPU_CONFIG, overrides))):
        count = parameters(str(config.model.name))
        train_token = 4 * count / (TRAIN_MFU * spec["flops"])  # forward + input gradients
        decode_step = 2 * count / (DECODE_EFFICIENCY * spec["bandwidth"])  # bf16 weights
        seconds = {stage: (trains or stage != "align") * train_tokens(config, rates, stage)
                   * train_token * lookup(rates.factor, config, stage, 1.0)
                   for stage in TRAIN_STAGES}
        steps = eval_budget(config, {}) / config.eval.batch_size  # one batch per decode step
        seconds["eval"] = (evaluations(trains, number == 0) * steps * decode_step
                           * lookup(rates.factor, config, "eval", 1.0))
        cells.append(Cell(run.name, seconds))
    return cells, count


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def this_precision() -> str:
    from hftlab.devices import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"


def plan_lines(sweep_file: Path, overrides: list[str] | None = None, gpu: str | None = None,
               gpus: int = 1, records: Path | None = None,
               precision: str | None = None) -> list[str]:
    """The text of ``hftlab plan``."""
    if gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    sweep = load_sweep(sweep_file, None, overrides, check=False)
    precision = precision or this_precision()
    folder = records or default_records()
    rates = measure(folder, precision)
    cells = cpu_cells(sweep, rates)
    pooled = " (no sft record times it: the median over every defense's records)"
    speeds = ", ".join(f"{1 / rates.seconds_per_token[s]:.0f} tokens/s in {label}"
                       + pooled * (s in rates.pooled_stages)
                       for s, label in (("finetune", "fine-tuning"), ("align", "alignment")))
    paired = (f"; {rates.paired} defense stage costs read against sft's on the same machine"
              if rates.paired else "")
    if rates.left_out:
        paired += f"; {rates.left_out} timing(s) made under load from other work left out"
    if rates.under_load:
        paired += f"; {rates.under_load} defense stage cost(s) timed only under load"
    lines = [f"{sweep_file}: {len(cells)} runs from scratch on this CPU ({precision}; speeds "
             f"measured in {rates.records} records below {folder}: sft trains {speeds}{paired})"]
    for cell in cells:
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in cell.seconds.items() if v >= 30)
        guess = (f"; not measured for its defense or attack, priced as sft's: "
                 f"{', '.join(cell.unmeasured)}"
                 if cell.unmeasured else "")
        lines.append(f"  {cell.name}: {hours(cell.total)} ({stages} min{guess})")
    total = sum(c.total for c in cells)
    lines.append(f"total on this CPU: {hours(total)} run one after another")
    if guessed := [c for c in cells if c.unmeasured]:
        lines.append(f"  of which {len(guessed)} runs ({hours(sum(c.total for c in guessed))}) "
                     f"price a stage as plain sft's: no record below {folder} measures it")
    lines += gpu_lines(sweep, rates, gpu or "h100", gpus)
    return lines


def gpu_lines(sweep: Sweep, rates: Rates, gpu: str, gpus: int) -> list[str]:
    cells, count = gpu_cells(sweep, rates, gpu)
    spec = GPUS[gpu]
    total = sum(c.total for c in cells)
    wall = max(total / gpus, max((c.total for c in cells), default=0.0))
    cpu_flops = 4 * 1.35e8 / rates.seconds_per_token["finetune"]
    return [
        f"the same {len(cells)} runs at the 7B protocol ({GPU_CONFIG.name}, "
        f"{count / 1e9:.2f} B parameters) on {spec['name']}: {total / 3600:.1f} GPU-hours; "
        f"on {gpus} GPU(s), one run per GPU: about {hours(wall)} wall time",
        "assumptions: LoRA training costs 4·P FLOPs per token (forward, input gradients; "
        f"frozen weights get none) at {TRAIN_MFU:.0%} of {spec['flops'] / 1e12:.0f} TFLOP/s "
        "bf16; generation reads the bf16 weights (2·P bytes) once per decode step of a batch "
        f"at {DECODE_EFFICIENCY:.0%} of {spec['bandwidth'] / 1e12:.2f} TB/s; tokens per row "
        "and each defense's cost relative to sft as measured here; prefill, model loading, "
        "checkpoints and an attack's search (Virus's GCG) not counted",
        f"(measured here: sft fine-tuning of the 135M model runs at {cpu_flops / 1e9:.0f} GFLOP/s "
        "effective by the same 4·P count)",
    ]
