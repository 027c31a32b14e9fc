"""Each defense's settings beside its reference run: the tables of ``docs/defenses.md`` and of
``hftlab list``, computed from the code so that they cannot go stale.

A defense declares ``reference_settings`` (:class:`hftlab.defenses.base.ReferenceSetting`): the
value each setting has in the reference code and the file that sets it. Beside it this module puts

- the hftlab default: an option's ``Options`` default (``defense_args.X``), or a config path's
  value in ``hftlab run configs/cpu_sst2_ref.yaml defense=NAME`` (:data:`REFERENCE_CONFIG`);
- the CPU preset: the value in the first run of ``configs/sweeps/cpu_defenses.yaml``
  (:data:`CPU_SWEEP`) whose defense is NAME (its config, the sweep's ``set``, the cell's
  ``defense_args``).

``finetune.train.*`` keys go through the defense's ``finetune_train`` hook: the settings its
fine-tuning stage actually trains with. Without the protocol files (an installed package has no
``configs/``) those columns show "—". ``hftlab docs`` writes :data:`DOCS_PATH`; ``--check`` and a
test compare it with what the code would write.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftlab.config import Config, load_config
from hftlab.data.spec import DataSpec

if TYPE_CHECKING:
    from hftlab.defenses.base import Defense, ReferenceSetting

# repo-relative; resolved against the source checkout this module lives in
REFERENCE_CONFIG = "configs/cpu_sst2_ref.yaml"
CPU_SWEEP = "configs/sweeps/cpu_defenses.yaml"
DOCS_PATH = "docs/defenses.md"
ROOT = Path(__file__).resolve().parents[2]
ABSENT = "—"  # no protocol file, or no sweep cell for the defense
OPTION_PREFIX = "defense_args."
FINETUNE_TRAIN = "finetune.train."
SPEC_FIELDS = {f.name for f in dataclasses.fields(DataSpec)}


@dataclass(frozen=True)
class SettingRow:
    """One line of a defense's table: values formatted for display; ``*_differs``: the value is
    not the reference's."""

    key: str
    reference: str
    source: str
    default: str
    cpu: str
    note: str
    default_differs: bool
    cpu_differs: bool


# ------------------------------------------------------------------------------ resolving


def option_default(cls: type[Defense], name: str) -> Any:
    """The ``Options`` default of option ``name``; KeyError when the defense has no such option."""
    for f in dataclasses.fields(cls.Options) if cls.Options is not None else ():
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(f"defense '{cls.name}': reference setting 'defense_args.{name}' names no "
                   f"option (options: {option_names(cls) or 'none'})")


def option_names(cls: type[Defense]) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls.Options)) if cls.Options else ""


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in a type hint (``DataSpec | None`` → DataSpec), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [_dataclass_of(arg) for arg in typing.get_args(tp)]
        return next((cls for cls in found if cls is not None), None)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def config_path_exists(path: str) -> bool:
    """Whether ``path`` (``alignment.train.lora.r``) names a field of :class:`Config`."""
    cls: type | None = Config
    for part in path.split("."):
        if cls is None or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = _dataclass_of(typing.get_type_hints(cls)[part])
    return True


def check_key(cls: type[Defense], key: str) -> None:
    """KeyError unless ``key`` is ``defense_args.OPTION`` of ``cls`` or a config path."""
    if key.startswith(OPTION_PREFIX):
        option_default(cls, key[len(OPTION_PREFIX):])
    elif not config_path_exists(key):
        raise KeyError(f"defense '{cls.name}': reference setting '{key}' is neither "
                       f"'defense_args.OPTION' nor a config path (e.g. finetune.train.lr)")


def _walk(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if value is None:
            return None
        value = getattr(value, part)
    return value


def run_value(config: Config, defense: Defense, key: str) -> Any:
    """``key``'s value in a run of ``config`` with ``defense`` (options from the defense,
    fine-tuning settings through its ``finetune_train`` hook)."""
    if key.startswith(OPTION_PREFIX):
        return getattr(defense.options, key[len(OPTION_PREFIX):])
    if key.startswith(FINETUNE_TRAIN):
        train = defense.finetune_train(config.finetune.train)
        return _walk(train, key[len(FINETUNE_TRAIN):].split("."))
    return _walk(config, key.split("."))


def make_defense(config: Config) -> Defense:
    from hftlab.defenses.composite import build_defense

    return build_defense(config.defense, config.defense_args)


@functools.cache
def reference_config(name: str, root: Path = ROOT) -> Config | None:
    """The config of ``hftlab run configs/cpu_sst2_ref.yaml defense=NAME`` (None: no file)."""
    path = root / REFERENCE_CONFIG
    return load_config(path, [f"defense={name}"]) if path.is_file() else None


@functools.cache
def cpu_preset_configs(root: Path = ROOT) -> dict[str, Config] | None:
    """Each defense's config in its first planned run of the CPU sweep (None: no sweep file)."""
    from hftlab.sweep import load_sweep

    path = root / CPU_SWEEP
    if not path.is_file():
        return None
    sweep = load_sweep(path)
    cells: dict[str, Config] = {}
    for run in sweep.planned:
        config = load_config(sweep.config, run.overrides)
        cells.setdefault(config.defense_label, config)
    return cells


def cpu_preset_config(name: str, root: Path = ROOT) -> Config | None:
    """The config of the CPU sweep's first run of defense ``name`` (None: no file, no cell)."""
    return (cpu_preset_configs(root) or {}).get(name)


# ----------------------------------------------------------------------------- formatting


def format_value(value: Any) -> str:
    """A compact display form: ``5e-5``, ``q_proj, k_proj``, a data spec on one line."""
    if isinstance(value, DataSpec):
        return format_spec(value)
    if isinstance(value, dict) and "kind" in value and set(value) <= SPEC_FIELDS:
        return format_spec(DataSpec(**value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_float(value: float) -> str:
    """``5e-4``, ``0.1``, ``1e9``: small and large numbers as a learning rate is written."""
    if value != 0 and not 1e-2 <= abs(value) < 1e6:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def format_spec(spec: DataSpec) -> str:
    """``refusal runs/data/beavertails_refusals.jsonl n=100 refusals_only=true``: kind, path,
    offset, n and the kind's options (which rows are kept is part of the data); a mix lists its
    sources."""
    options = dict(spec.options or {})
    sources = options.pop("sources", None) if spec.kind == "mix" else None
    if isinstance(sources, list):
        head = f"mix({'; '.join(format_value(source) for source in sources)})"
    else:
        head = " ".join(p for p in (spec.kind, spec.path or spec.hub, spec.split) if p)
    for name in ("offset", "n"):
        value = getattr(spec, name)
        if value:
            head += f" {name}={value}"
    for name, value in options.items():
        head += f" {name}={format_value(value)}"
    return head


def same_value(reference: Any, value: Any) -> bool:
    """Whether a run's ``value`` is the reference's (numbers up to rounding, lists as lists)."""
    numbers = (int, float)
    if isinstance(reference, numbers) and isinstance(value, numbers) and not (
            isinstance(reference, bool) or isinstance(value, bool)):
        return math.isclose(reference, value, rel_tol=1e-9, abs_tol=0.0)
    return format_value(reference) == format_value(value)


# ---------------------------------------------------------------------------------- rows


def setting_rows(cls: type[Defense], root: Path = ROOT) -> list[SettingRow]:
    """The table of defense ``cls``: one row per declared reference setting."""
    settings: tuple[ReferenceSetting, ...] = cls.reference_settings
    for setting in settings:
        check_key(cls, setting.key)
    if not settings:
        return []
    ref_config = reference_config(cls.name, root)
    cpu_config = cpu_preset_config(cls.name, root)
    ref_defense = make_defense(ref_config) if ref_config is not None else None
    cpu_defense = make_defense(cpu_config) if cpu_config is not None else None
    rows = []
    for s in settings:
        if s.key.startswith(OPTION_PREFIX):
            default: Any = option_default(cls, s.key[len(OPTION_PREFIX):])
            has_default = True
        else:
            has_default = ref_config is not None and ref_defense is not None
            default = run_value(ref_config, ref_defense, s.key) if has_default else None
        has_cpu = cpu_config is not None and cpu_defense is not None
        cpu = run_value(cpu_config, cpu_defense, s.key) if has_cpu else None
        rows.append(SettingRow(
            key=s.key, reference=format_value(s.reference), source=s.source,
            default=format_value(default) if has_default else ABSENT,
            cpu=format_value(cpu) if has_cpu else ABSENT, note=s.note,
            default_differs=has_default and not same_value(s.reference, default),
            cpu_differs=has_cpu and not same_value(s.reference, cpu),
        ))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[SettingRow]) -> str:
    """The settings as a markdown table; a value that differs from the reference is bold."""
    lines = ["| setting | reference | reference file | hftlab default | CPU preset | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        default = f"**{_cell(r.default)}**" if r.default_differs else _cell(r.default)
        cpu = f"**{_cell(r.cpu)}**" if r.cpu_differs else _cell(r.cpu)
        lines.append(f"| `{r.key}` | {_cell(r.reference)} | {_cell(r.source)} | {default} | "
                     f"{cpu} | {_cell(r.note)} |")
    return "\n".join(lines)


def text_lines(rows: list[SettingRow]) -> list[str]:
    """``key: reference / default / CPU preset`` per row; ``≠`` marks a value unlike the
    reference's (``hftlab list``)."""
    def mark(value: str, differs: bool) -> str:
        return f"≠{value}" if differs else value

    return [f"{r.key}: {r.reference} / {mark(r.default, r.default_differs)} / "
            f"{mark(r.cpu, r.cpu_differs)}" for r in rows]


HEADER = f"""# Defenses: reference settings beside hftlab's

Generated by `hftlab docs` from each defense's `reference_settings` and the protocol files; do
not edit by hand (a test fails when this file and the code disagree). Regenerate it with
`.venv/bin/hftlab docs`.

Columns: **reference** is the value in the defense's reference code, set in **reference file**;
**hftlab default** is an option's default (`defense_args.*`) or the value in the run
`hftlab run {REFERENCE_CONFIG} defense=NAME`; **CPU preset** the value in the
defense's first run of `{CPU_SWEEP}`. `finetune.train.*` values are those
the defense's fine-tuning stage trains with. A **bold** value differs from the reference;
**note** says why. "{ABSENT}": no protocol file, or no run of the defense in the sweep."""


def defense_section(cls: type[Defense], root: Path = ROOT) -> str:
    lines = [f"## {cls.name}", "", cls.doc_line(), ""]
    if cls.paper:
        lines.append(f"- paper: {cls.paper}")
    if cls.reference:
        lines.append(f"- reference: {cls.reference}")
    rows = setting_rows(cls, root)
    table = markdown_table(rows) if rows else "No reference settings declared."
    return "\n".join([*lines, "", table])


def render_docs(root: Path = ROOT) -> str:
    """The whole of ``docs/defenses.md``."""
    from hftlab.defenses import DEFENSES

    sections = [defense_section(DEFENSES.get(name), root) for name in DEFENSES.names()]
    return "\n\n".join([HEADER, *sections]) + "\n"


def docs_drift(path: Path, root: Path = ROOT) -> str | None:
    """None when ``path`` holds what :func:`render_docs` writes, else a one-line reason."""
    if not path.is_file():
        return f"{path} does not exist: run `hftlab docs --out {path}`"
    if path.read_text() != render_docs(root):
        return f"{path} is out of date with the code: run `hftlab docs --out {path}`"
    return None

