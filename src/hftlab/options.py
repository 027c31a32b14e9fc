"""Typed settings from user-written mappings: the run config's sections and every plug-in's
``Options`` are built here, with errors that name the dotted key.

Rules that hold for every dataclass built this way:

- unknown keys fail with a did-you-mean; values are coerced to the field's type or fail;
- a number must be finite, and lie in its field's range when ``NUMERIC_BOUNDS`` gives one;
- a nested section given partly merges into its default, except that a mapping naming a new
  section (a ``kind`` key: a new data source; a ``preset`` key: a new LoRA adapter) replaces it;
- a dataclass may define ``expand_raw(raw, where, prefix)`` (a classmethod) to rewrite its
  mapping before it is read (LoRA presets).

This module imports nothing from hftlab but the errors and the data-source dataclass, so the
config and the plug-in registries can both use it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from hftlab.data.spec import DataSpec
from hftlab.errors import ConfigError

# keys that make a mapping a new section instead of changes to the default one
REPLACING_KEYS = ("kind", "preset")


@dataclass(frozen=True)
class Bound:
    """Where a numeric setting may lie (ends included unless ``*_open``). ``note`` says what a
    special value means; an optional setting also accepts null."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        if not _finite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, "
                    f"{high}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {high}"
        return "finite"


def _finite(value: float) -> bool:
    # an int is always finite, and math.isfinite overflows on one beyond float's range
    return isinstance(value, int) or math.isfinite(value)


def _number_text(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value}"


POSITIVE = Bound(0, low_open=True)
AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)

# The range of every numeric setting, by the dataclass that holds it. A data source may appear
# in a plug-in's options too, so its ranges live here; the run config's sections add theirs
# where they are defined (hftlab.config), which every caller that has them has imported.
NUMERIC_BOUNDS: dict[type, dict[str, Bound]] = {
    DataSpec: {"n": Bound(1, note="null: every row"), "offset": NON_NEGATIVE},
}


def check_number(cls: type, name: str, tp: Any, value: Any, where: str, key: str) -> None:
    """One ConfigError naming ``key`` and its allowed range when ``value`` is out of it; any
    float, bounded or not (a plug-in's options), must be finite."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_number(cls, name, None, item, where, f"{key}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bound = NUMERIC_BOUNDS.get(cls, {}).get(name) if tp is not None else None
    if bound is None:
        if not _finite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return
    if bound.holds(value):
        return
    optional = type(None) in typing.get_args(tp)
    kind = "a finite number" if float in (tp, *typing.get_args(tp)) else "a whole number"
    # a closed range already says "finite"; "> 0, got inf" alone would read as satisfied
    two_sided = bound.low is not None and bound.high is not None
    rule = (bound.describe() if two_sided else f"{kind} {bound.describe()}")
    rule += " or null" if optional else ""
    note = f" ({bound.note})" if bound.note else ""
    raise ConfigError(f"{where}: '{key}' must be {rule}{note}, got {value!r}")


def _names_new_section(value: Any) -> bool:
    return isinstance(value, dict) and any(key in value for key in REPLACING_KEYS)


def _has_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Recursively turn a mapping into dataclass ``cls``, with errors naming the dotted key.

    A nested section given partly (``eval.harmful.n=300``) merges into its default; a data
    source given with a new ``kind`` replaces the default source whole.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    defaults = cls() if _has_defaults(cls) else None
    kwargs: dict[str, Any] = {}
    expand = getattr(cls, "expand_raw", None)
    if expand is not None:
        raw = expand(raw, where, prefix)
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'.{hint} Known keys here: {', '.join(names)}"
            )
        default = getattr(defaults, key, None)
        if (dataclasses.is_dataclass(default) and isinstance(value, dict)
                and not _names_new_section(value)):
            merged = dataclasses.asdict(default)
            _deep_update(merged, value)
            value = merged
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
        check_number(cls, key, hints[key], kwargs[key], where, f"{prefix}{key}")
    missing = [f.name for f in fields if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        what = " (the loader name)" if cls is DataSpec and missing[0] == "kind" else ""
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' needs a '{missing[0]}'{what}")
    return cls(**kwargs)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        # A data source given with its kind is a new source, a LoRA given by its preset a new
        # adapter, a loader's options a new set: replace, don't merge.
        replace = key == "options" or _names_new_section(value) or not isinstance(value, dict)
        if isinstance(base.get(key), dict) and not replace:
            _deep_update(base[key], value)
        else:
            base[key] = value


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, f"{key}.")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    return _coerce_scalar(tp, value, where, key)


def _coerce_scalar(tp: Any, value: Any, where: str, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    return value
