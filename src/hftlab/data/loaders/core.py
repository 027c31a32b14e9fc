"""Core of the loaders: the registry, path resolution, spec/option checks and the entry point.

Every loader is registered in :data:`LOADERS` under its ``kind`` and called as
``loader(spec, data_root)``. :func:`load_examples` is the entry point: it checks the spec, calls the
loader, then keeps ``examples[offset : offset + n]``. Loaders read their rows through
:func:`_records` (a record file or a hub split) or :func:`_local_path` (local files only).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hftlab.data.loaders.readers import (
    _hub_records,
    _hub_source,
    _read_records,
    _Rec,
    hub_rows,
)
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

Loader = Callable[[DataSpec, Path | None], list[Example]]

LOADERS: dict[str, Loader] = {}
"""Registry of loaders by ``DataSpec.kind``."""

_SOURCELESS_KINDS: set[str] = set()
_PATH_HINT = ("set --data-root, HFTLAB_DATA_ROOT or the config's data_root to the folder that "
              "holds the data, or give an absolute path")


def _path_hint() -> str:
    env_root = os.environ.get("HFTLAB_DATA_ROOT")
    if env_root:  # the user already set it: say that it, not the config, was searched
        return (f"HFTLAB_DATA_ROOT (or --data-root) is {env_root} and wins over the config's "
                "data_root; point it at the folder that holds this file, or give an absolute path")
    return _PATH_HINT


def register_loader(kind: str, *, needs_source: bool = True) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn`` as the loader for ``kind`` (a later registration replaces it).

    ``needs_source=False`` marks kinds that read files shipped with hftlab (the demo pack): for
    those :func:`load_examples` rejects ``path``/``hub`` instead of requiring one of them.
    """

    def decorator(fn: Loader) -> Loader:
        LOADERS[kind] = fn
        if needs_source:
            _SOURCELESS_KINDS.discard(kind)
        else:
            _SOURCELESS_KINDS.add(kind)
        return fn

    return decorator


# ---------------------------------------------------------------------------------------------
# Paths, spec checks, fingerprint, entry point
# ---------------------------------------------------------------------------------------------


def resolve_path(path: str, data_root: Path | None) -> Path:
    """Find a data file: an absolute path as is; a relative one in the cwd, then in ``data_root``.

    Raises :class:`DataError` naming the path, every location tried and how to fix it.
    """
    given = Path(path).expanduser()
    if given.is_absolute():
        candidates = [given]
    else:
        candidates = [Path.cwd() / given]
        if data_root is not None:
            candidates.append(Path(data_root).expanduser() / given)
    for candidate in candidates:
        if candidate.is_dir():
            raise DataError(f"data path {path!r} resolves to a directory ({candidate}); "
                            "point path: at a data file inside it")
        if candidate.exists():
            return candidate
    tried = "; ".join(str(c) for c in candidates)
    root_note = "" if given.is_absolute() or data_root is not None else " (data_root is not set)"
    raise DataError(f"data file {path!r} not found; tried: {tried}{root_note}. Fix: {_path_hint()}")


def _require_one_source(spec: DataSpec, kind: str) -> None:
    if spec.path and spec.hub:
        raise DataError(f"data kind {kind!r}: both path ({spec.path!r}) and hub ({spec.hub!r}) are "
                        "set; keep exactly one of them")
    if not spec.path and not spec.hub:
        raise DataError(f"data kind {kind!r} needs a source: set path: (a local file) or hub: "
                        "(a Hugging Face dataset id, optionally with split:)")


def _require_no_source(spec: DataSpec, kind: str) -> None:
    given = [k for k in ("path", "hub", "split") if getattr(spec, k)]
    if given:
        raise DataError(f"data kind {kind!r} reads the demo pack shipped with hftlab and takes no "
                        f"{'/'.join(given)}; remove {', '.join(given)} from the config (or use a "
                        "non-demo kind for your own file)")


def _check_window(spec: DataSpec) -> tuple[int, int | None]:
    offset, n = spec.offset, spec.n
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DataError(f"data kind {spec.kind!r}: offset must be an integer >= 0, got {offset!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"data kind {spec.kind!r}: n must be an integer >= 1 (or unset for all "
                        f"rows), got {n!r}")
    return offset, n


def _describe_source(spec: DataSpec) -> str:
    if spec.kind == "mix":
        return "the mix (options.sources)"
    if spec.kind in _SOURCELESS_KINDS:
        return f"demo pack ({spec.kind})"
    if spec.path:
        return spec.path
    return f"hub:{spec.hub}" + (f"[{spec.split}]" if spec.split else "")


def load_examples(spec: DataSpec, data_root: Path | None = None) -> list[Example]:
    """Load the rows ``spec`` describes and return ``examples[offset : offset + n]``.

    Raises :class:`DataError` for an unknown kind, a missing/duplicate source, bad rows, or when
    the source has fewer usable rows (after the loader's filtering) than ``offset + n``.
    """
    loader = LOADERS.get(spec.kind)
    if loader is None:
        known = ", ".join(sorted(LOADERS))
        raise DataError(f"unknown data kind {spec.kind!r}; known kinds: {known}")
    if spec.kind in _SOURCELESS_KINDS:
        _require_no_source(spec, spec.kind)
    else:
        _require_one_source(spec, spec.kind)
    offset, n = _check_window(spec)
    examples = loader(spec, data_root)
    source = (examples[0].source if examples and examples[0].source and spec.kind != "mix"
              else _describe_source(spec))
    available = len(examples)
    too_few = offset + n > available if n is not None else offset >= available
    if too_few:
        asked = n if n is not None else "all"
        raise DataError(f"{source} has only {available} usable rows (after filtering); the config "
                        f"asks for offset={offset}, n={asked}: lower n/offset or use a larger file")
    picked = examples[offset:] if n is None else examples[offset : offset + n]
    for ex in picked:
        if not ex.source:
            ex.source = source
    return picked


def data_fingerprint(examples: list[Example]) -> str:
    """SHA-256 hex digest of the examples' content, for cache keys.

    Covers ``prompt``, ``response``, ``is_harmful`` and ``label`` in order (order matters for
    training); ``source``, ``row`` and ``meta`` are provenance and do not change the digest.
    """
    payload = [
        {"prompt": e.prompt, "response": e.response, "is_harmful": e.is_harmful, "label": e.label}
        for e in examples
    ]
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def _options(
    spec: DataSpec,
    kind: str,
    accepted: Mapping[str, Any],
    *,
    hub: bool,
    config_default: str | None = None,
) -> dict[str, Any]:
    """Merge ``spec.options`` over ``accepted`` defaults; unknown or ill-typed options are errors.

    Loaders that support ``hub:`` also accept ``config`` (the hub config name), which is only
    valid together with ``hub:``.
    """
    allowed: dict[str, Any] = dict(accepted)
    if hub:
        allowed["config"] = config_default
    options = spec.options or {}
    if not isinstance(options, Mapping):
        raise DataError(f"data kind {kind!r}: options must be a mapping, got {options!r}")
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise DataError(f"data kind {kind!r}: unknown option(s) {', '.join(unknown)}; accepted "
                        f"options: {', '.join(sorted(allowed)) or 'none'}")
    out = {**allowed, **options}
    for key, default in accepted.items():
        if isinstance(default, bool) and not isinstance(out[key], bool):
            raise DataError(f"data kind {kind!r}: option {key!r} must be true or false, "
                            f"got {out[key]!r}")
    if hub:
        if "config" in options and spec.hub is None:
            raise DataError(f"data kind {kind!r}: option 'config' names a hub dataset config and "
                            "only applies with hub:; remove it for a local path")
        if out["config"] is not None and not isinstance(out["config"], str):
            raise DataError(f"data kind {kind!r}: option 'config' must be a string, "
                            f"got {out['config']!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Sources: a local file or a hub split
# ---------------------------------------------------------------------------------------------


def _local_path(spec: DataSpec, kind: str, data_root: Path | None) -> tuple[str, Path]:
    """Resolve ``spec.path`` for loaders that read local files only."""
    _require_one_source(spec, kind)
    if spec.hub:
        raise DataError(f"data kind {kind!r} reads local files only; download the data and set "
                        f"path: instead of hub: {spec.hub!r}")
    if spec.split:
        raise DataError(f"data kind {kind!r}: split ({spec.split!r}) only applies to hub: "
                        "sources; remove it (pick the split by choosing the file)")
    path = resolve_path(str(spec.path), data_root)
    return str(path), path


def _records(
    spec: DataSpec,
    kind: str,
    data_root: Path | None,
    *,
    default_split: str,
    config: str | None,
) -> tuple[str, list[_Rec]]:
    """Source string and rows for loaders that read a record file or a hub split."""
    _require_one_source(spec, kind)
    if spec.hub:
        split = spec.split or default_split
        source = _hub_source(spec.hub, split, config)
        return source, _hub_records(hub_rows(spec.hub, split, config), source)
    source, path = _local_path(spec, kind, data_root)
    return source, _read_records(path, source)


def _options_and_records(
    spec: DataSpec,
    kind: str,
    data_root: Path | None,
    accepted: Mapping[str, Any],
    *,
    default_split: str,
    config_default: str | None = None,
) -> tuple[dict[str, Any], str, list[_Rec]]:
    """Checked options, source string and rows for a loader that reads a record file or a hub
    split: :func:`_options` (with ``config``) followed by :func:`_records`."""
    opts = _options(spec, kind, accepted, hub=True, config_default=config_default)
    source, recs = _records(spec, kind, data_root, default_split=default_split,
                            config=opts["config"])
    return opts, source, recs
