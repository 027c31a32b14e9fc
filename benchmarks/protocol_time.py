"""Wall time of a protocol's runs, stage by stage, from the committed records.

Reads ``stages.<stage>.seconds`` of every ``<folder>/*/metrics.json``. A stage that was reused
from the cache (``cached: true``, an alignment another run trained) records only its load time;
its ``train_seconds`` is what training it took, shown separately. Prints, per folder, the
median seconds of each stage over the runs that computed it, the per-cell means (cell: the run
folder without ``_seed-N``), and the total recorded stage time of all the runs (markdown tables).

    python benchmarks/protocol_time.py results/parity_first_mix_bf16 results/cpu_defenses_fp32
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

STAGES = ("data", "align", "finetune", "post_finetune", "eval")


def load(folder: Path) -> list[tuple[str, str, dict]]:
    """(cell, precision, stages) of every run in ``folder``."""
    runs = []
    for path in sorted(folder.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        cell = re.sub(r"_seed-\d+$", "", path.parent.name)
        runs.append((cell, metrics.get("precision", "?"), metrics.get("stages", {})))
    return runs


def computed(stage: dict) -> bool:
    return not stage.get("cached", False)


def mean_seconds(group: list[dict], stage: str) -> float:
    return statistics.fmean(s.get(stage, {}).get("seconds", 0.0) for s in group)


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def report(folder: Path) -> None:
    runs = load(folder)
    if not runs:
        print(f"{folder}: no metrics.json")
        return
    precisions = sorted({p for _, p, _ in runs})
    total = sum(s.get("seconds", 0.0) for _, _, stages in runs for s in stages.values())
    print(f"\n{folder} · {len(runs)} runs · precision {', '.join(precisions)} · "
          f"recorded stage time {total / 3600:.1f} h\n")
    print("| stage | runs that computed it | median | min–max | sum |")
    print("|---|---|---|---|---|")
    for name in STAGES:
        values = [stages[name]["seconds"] for _, _, stages in runs
                  if name in stages and computed(stages[name])]
        if not values:
            continue
        print(f"| {name} | {len(values)} | {fmt(statistics.median(values))} | "
              f"{fmt(min(values))}–{fmt(max(values))} | {sum(values) / 3600:.2f} h |")
    cached = [stages["align"].get("train_seconds", 0.0) for _, _, stages in runs
              if "align" in stages and not computed(stages["align"])]
    if cached:
        print(f"\n{len(cached)} runs reused a cached alignment (its training took "
              f"{fmt(statistics.median(cached))}, median, when first run)")
    cells: dict[str, list[dict]] = defaultdict(list)
    for cell, _, stages in runs:
        cells[cell].append(stages)
    print("\n| cell | runs | align | finetune | eval | per run | all runs |")
    print("|---|---|---|---|---|---|---|")
    for cell, group in sorted(cells.items()):
        mean = {stage: mean_seconds(group, stage) for stage in STAGES}
        per_run = sum(mean.values())
        all_cached = all(not computed(s.get("align", {})) for s in group)
        align = "cached" if all_cached else fmt(mean["align"])
        print(f"| {cell} | {len(group)} | {align} | {fmt(mean['finetune'])} | "
              f"{fmt(mean['eval'])} | {fmt(per_run)} | {per_run * len(group) / 3600:.2f} h |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    for folder in args.folders:
        report(folder)


if __name__ == "__main__":
    main()
