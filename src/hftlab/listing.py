"""What ``hftlab list`` shows: each registered defense, attack and judge (summary, paper,
reference code, options with their defaults, a defense's reference-settings table) and each
task, as plain data (``--json``) or as text lines."""

from __future__ import annotations

import dataclasses
from typing import Any


def plain(value: Any) -> Any:
    """``value`` as JSON values (a data spec becomes its mapping, a path its text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def option_defaults(cls: type) -> dict[str, Any]:
    """Each option of a plug-in (what ``*_args`` accepts) with its default, as JSON values."""
    options = getattr(cls, "Options", None)
    if options is None:
        return {}
    found = {}
    for f in dataclasses.fields(options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        found[f.name] = plain(default)
    return found


def _plugin_entry(cls: Any, with_settings: bool) -> dict[str, Any]:
    from hftlab.defense_settings import setting_rows

    entry: dict[str, Any] = {
        "name": cls.name, "summary": cls.doc_line(), "paper": cls.paper or None,
        "reference": cls.reference or None, "options": option_defaults(cls),
    }
    if with_settings:
        entry["settings"] = [dataclasses.asdict(row) for row in setting_rows(cls)]
    return entry


def catalog(kinds: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{kind: [entry, ...]}`` for each of ``kinds`` (defenses, attacks, judges, tasks)."""
    from hftlab.attacks import ATTACKS
    from hftlab.defenses import DEFENSES
    from hftlab.judges import JUDGES
    from hftlab.tasks import TASKS

    registries = {"defenses": DEFENSES, "attacks": ATTACKS, "judges": JUDGES}
    found: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        if kind == "tasks":
            found[kind] = [{"name": name, "instruction": task.instruction.strip()}
                           for name, task in TASKS.items()]
            continue
        registry = registries[kind]
        found[kind] = [_plugin_entry(registry.get(name), kind == "defenses")
                       for name in registry.names()]
    return found


def catalog_lines(entries: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The text of ``hftlab list``: a heading per kind, a block per entry."""
    from hftlab.defense_settings import SettingRow, text_lines

    pad = " " * 16
    lines: list[str] = []
    for kind, items in entries.items():
        lines.append(f"{kind}:")
        for item in items:
            if kind == "tasks":
                lines.append(f"  {item['name']:<14} {item['instruction'].splitlines()[0]}")
                continue
            lines.append(f"  {item['name']:<14} {item['summary']}")
            if item["paper"]:
                lines.append(f"{pad}paper: {item['paper']}")
            if item["reference"]:
                lines.append(f"{pad}reference: {item['reference']}")
            if item["options"]:
                shown = ", ".join(f"{k}={v}" for k, v in item["options"].items())
                lines.append(f"{pad}options: {shown}")
            rows = [SettingRow(**row) for row in item.get("settings", [])]
            if rows:
                lines.append(f"{pad}settings (reference / default / CPU preset; ≠ differs):")
                lines.extend(f"{pad}  {line}" for line in text_lines(rows))
    return lines
