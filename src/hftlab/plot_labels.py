"""Short names for the cells of a sweep, and what the sweep varies.

A cell's label holds every setting that differs between cells (``defense``, ``defense_args``,
``finetune.train.lr``, ...): printed whole it is a paragraph. The plots name a cell by its
defense and attack, add an option of theirs only where two cells of the same defense or attack
differ in it, and add any other setting only where it tells apart cells that would otherwise
share a name."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hftlab.compare import Cell
from hftlab.plot_base import POISON, Group, colour_for
from hftlab.setting_names import setting_names

PRIMARY = ("defense", "attack")  # named by value alone, in this order


def value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _frozen(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _options(labels: Sequence[dict[str, Any]], key: str) -> list[str]:
    """Per label, the options of its ``key`` (``attack_args``) that differ between labels with
    the same ``key`` value, as ``name=value``."""
    args = f"{key}_args"
    by_value: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for label in labels:
        by_value[_frozen(label.get(key))].append(label.get(args) or {})
    shown = []
    for label in labels:
        siblings = by_value[_frozen(label.get(key))]
        own = label.get(args) or {}
        differing = [k for k in own if len({_frozen(s.get(k)) for s in siblings}) > 1]
        shown.append(", ".join(f"{k}={value_text(own[k])}" for k in differing))
    return shown


def series_names(labels: Sequence[dict[str, Any]]) -> list[str]:
    """The shortest names that still tell the labels apart (equal labels share a name):
    ``vaccine``; ``sft / backdoor, lr=0.0005``; ``pure_harmful(n_harmful=10)``."""
    labels = list(labels)
    parts: list[list[str]] = [[] for _ in labels]
    used = set()
    for key in PRIMARY:
        if not any(key in label for label in labels):
            continue
        used |= {key, f"{key}_args"}
        for part, label, options in zip(parts, labels, _options(labels, key)):
            text = value_text(label.get(key))
            part.append(f"{text}({options})" if options else text)
    names = [" / ".join(p) for p in parts]
    rest = sorted({k for label in labels for k in label} - used)
    short = setting_names(k for label in labels for k in label)
    for key in rest:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(names):
            groups[name].append(index)
        for members in groups.values():
            if len({_frozen(labels[i].get(key)) for i in members}) < 2:
                continue
            for i in members:
                setting = f"{short[key]}={value_text(labels[i].get(key))}"
                names[i] = f"{names[i]}, {setting}" if names[i] else setting
    return [name or "all runs" for name in names]


def ratio_is_swept(labels: Sequence[dict[str, Any]]) -> bool:
    """Whether some cells differ only in the poison ratio: then it is a sweep axis (a panel
    each, the x of the harmful-score plot), not a setting that comes with an attack."""
    seen: dict[str, set[str]] = defaultdict(set)
    for label in labels:
        if POISON in label:
            rest = {k: v for k, v in label.items() if k != POISON}
            seen[_frozen(rest)].add(_frozen(label[POISON]))
    return any(len(ratios) > 1 for ratios in seen.values())


def groups_from_cells(cells: list[Cell]) -> list[Group]:
    """One :class:`Group` per sweep cell with its short name and colour, faceted by the poison
    ratio when the sweep varies it on its own."""
    labels = [c.label for c in cells]
    swept = ratio_is_swept(labels)
    named = [{k: v for k, v in label.items() if k != POISON or not swept} for label in labels]
    names = series_names(named)
    colours = colour_for(names)
    return [Group(name, colours[name], [r.metrics for r in cell.runs],
                  cell.label.get(POISON) if swept else None,
                  sorted(r.seed for r in cell.runs), dict(cell.label))
            for name, cell in zip(names, cells)]


@dataclass(frozen=True)
class Varies:
    """What a sweep varies, which decides its plots."""

    ratio: bool
    defense: bool
    attack: bool


def what_varies(groups: Sequence[Group]) -> Varies:
    def differs(*keys: str) -> bool:
        return len({_frozen([g.settings.get(k) for k in keys]) for g in groups}) > 1

    return Varies(ratio=len({g.facet for g in groups}) > 1,
                  defense=differs("defense", "defense_args"),
                  attack=differs("attack", "attack_args"))


def without(groups: Sequence[Group], keys: Sequence[str]) -> list[str]:
    """The groups' short names with some settings left out (``defense``: the attack's name)."""
    return series_names([{k: v for k, v in g.settings.items() if k not in keys}
                         for g in groups])


def only(groups: Sequence[Group], keys: Sequence[str]) -> list[str]:
    """The groups' short names from some settings alone (``defense``: the defense's name)."""
    return series_names([{k: v for k, v in g.settings.items() if k in keys} for g in groups])
