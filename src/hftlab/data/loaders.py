"""Loaders: turn a :class:`DataSpec` into a list of :class:`Example`, one function per data kind.

Every loader is registered in :data:`LOADERS` under its ``kind`` and called as
``loader(spec, data_root)``. :func:`load_examples` is the entry point: it checks the spec, calls the
loader, then keeps ``examples[offset : offset + n]``.

Local files are read by suffix: ``.json`` (a list of objects), ``.jsonl``, ``.jsonl.gz`` (gzipped
JSON Lines), ``.json.gz`` (a gzipped ``.json`` document), ``.csv`` / ``.tsv`` (first row is the
header unless a loader documents otherwise; ``.tsv`` is read with ``csv.QUOTE_NONE``) and
``.parquet`` (needs ``pyarrow``). Hub sources are read with ``datasets.load_dataset`` (imported
only when used); every loader that supports ``hub:`` also accepts the option ``config`` (the hub
dataset's config name, passed as ``name=``).

Every row is validated: a missing, ill-typed or empty field raises :class:`DataError` naming the
file, the row (``line N`` for JSON Lines, ``row N (line L)`` for CSV/TSV, both 1-based, the header
not counted as a row; ``index i`` for JSON lists, parquet and hub rows), the field and the fields
expected. ``Example.source`` is the resolved file path or ``hub:<id>[<split>]`` and
``Example.row`` the 0-based data row in that source, so later reports can point at rows.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

Loader = Callable[[DataSpec, Path | None], list[Example]]

LOADERS: dict[str, Loader] = {}
"""Registry of loaders by ``DataSpec.kind``."""

_SOURCELESS_KINDS: set[str] = set()
_PATH_HINT = "set data_root in the config or HFTLAB_DATA_ROOT, or give an absolute path"
_RECORD_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".csv", ".tsv", ".parquet")


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
    raise DataError(f"data file {path!r} not found; tried: {tried}{root_note}. Fix: {_PATH_HINT}")


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
    source = examples[0].source if examples and examples[0].source else _describe_source(spec)
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
# Reading rows
# ---------------------------------------------------------------------------------------------


class _Rec(NamedTuple):
    """One raw row: ``fields`` (a dict, or a list of cells for header-less CSV), its 0-based
    data-row index and a human location such as ``line 3`` or ``row 2 (line 3)``."""

    fields: Any
    row: int
    where: str


def _fail(source: str, where: str, msg: str) -> DataError:
    return DataError(f"{source}, {where}: {msg}")


def _has_suffix(path: Path, *suffixes: str) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _read_text(path: Path, source: str) -> str:
    try:
        raw = path.read_bytes()
        if _has_suffix(path, ".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{source}: cannot read file: {e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text (bad byte at offset {e.start}); re-save "
                        "the file as UTF-8") from e


def _json_doc(path: Path, source: str) -> Any:
    text = _read_text(path, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data":
            hint = " (is this JSON Lines? then name the file .jsonl)"
        raise DataError(f"{source}, line {e.lineno}: malformed JSON: {e.msg} "
                        f"(column {e.colno}){hint}") from e


def _json_list_records(doc: Any, source: str) -> list[_Rec]:
    if not isinstance(doc, list):
        keys = f" with keys {sorted(doc)}" if isinstance(doc, dict) else ""
        raise DataError(f"{source}: expected a JSON list of objects, got a "
                        f"{type(doc).__name__}{keys}")
    recs = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise _fail(source, f"index {i}", f"expected a JSON object, got {type(item).__name__}")
        recs.append(_Rec(item, i, f"index {i}"))
    return recs


def _jsonl_records(path: Path, source: str) -> list[_Rec]:
    recs = []
    for lineno, line in enumerate(_read_text(path, source).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"malformed JSON: {e.msg} (column {e.colno})"
            raise _fail(source, f"line {lineno}", msg) from e
        if not isinstance(item, dict):
            raise _fail(source, f"line {lineno}",
                        f"expected a JSON object, got {type(item).__name__}")
        recs.append(_Rec(item, len(recs), f"line {lineno}"))
    return recs


def _csv_rows(path: Path, source: str, *, delimiter: str) -> list[tuple[list[str], int]]:
    """All non-blank CSV/TSV records with the (1-based) line each ends on. TSV: QUOTE_NONE."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_read_text(path, source), newline=""),
                        delimiter=delimiter, quoting=quoting, strict=True)
    rows = []
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                rows.append((cells, reader.line_num))
    except csv.Error as e:
        raise _fail(source, f"line {reader.line_num}", f"malformed CSV: {e}") from e
    return rows


def _csv_dict_records(path: Path, source: str, *, delimiter: str) -> list[_Rec]:
    rows = _csv_rows(path, source, delimiter=delimiter)
    if not rows:
        return []
    header = [c.strip() for c in rows[0][0]]
    recs = []
    for i, (cells, line) in enumerate(rows[1:]):
        where = f"row {i + 1} (line {line})"
        if len(cells) != len(header):
            raise _fail(source, where, f"expected {len(header)} fields as in the header "
                        f"({', '.join(header)}), got {len(cells)}")
        recs.append(_Rec(dict(zip(header, cells, strict=True)), i, where))
    return recs


def _parquet_records(path: Path, source: str) -> list[_Rec]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{source}: reading .parquet files needs pyarrow: pip install pyarrow "
                        "(or convert the file to .jsonl)") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{source}: cannot read parquet file: {e}") from e
    return [_Rec(row, i, f"index {i}") for i, row in enumerate(rows)]


def _read_records(path: Path, source: str) -> list[_Rec]:
    """Rows of a record file (objects with named fields), dispatched on the file suffix."""
    if _has_suffix(path, ".jsonl", ".jsonl.gz"):
        return _jsonl_records(path, source)
    if _has_suffix(path, ".json", ".json.gz"):
        return _json_list_records(_json_doc(path, source), source)
    if _has_suffix(path, ".csv"):
        return _csv_dict_records(path, source, delimiter=",")
    if _has_suffix(path, ".tsv"):
        return _csv_dict_records(path, source, delimiter="\t")
    if _has_suffix(path, ".parquet"):
        return _parquet_records(path, source)
    raise DataError(f"{source}: unsupported file type; expected one of "
                    f"{', '.join(_RECORD_SUFFIXES)}")


def hub_rows(hub_id: str, split: str, config: str | None) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset split, via ``datasets.load_dataset`` (imported lazily).

    The only network access in this module.
    """
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hub:{hub_id} needs the 'datasets' package: pip install datasets "
                        "(or download the data and use path:)") from e
    try:
        ds = datasets.load_dataset(hub_id, name=config, split=split)
    except Exception as e:  # network, auth, unknown split/config: all reported the same way
        raise DataError(f"cannot load hub:{hub_id} (config={config!r}, split={split!r}): "
                        f"{type(e).__name__}: {e}") from e
    return [dict(row) for row in ds]


def _hub_source(hub_id: str, split: str, config: str | None) -> str:
    return f"hub:{hub_id}" + (f"({config})" if config else "") + f"[{split}]"


def _hub_records(rows: Iterable[Any], source: str) -> list[_Rec]:
    recs = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise _fail(source, f"index {i}", f"expected a row mapping, got {type(row).__name__}")
        recs.append(_Rec(dict(row), i, f"index {i}"))
    return recs


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


# ---------------------------------------------------------------------------------------------
# Field access
# ---------------------------------------------------------------------------------------------


def _text(rec: _Rec, source: str, name: str, expected: str, *, required: bool = True) -> str:
    """String field ``name``; required fields must be present and non-empty. Optional fields
    that are absent or null come back as ``""``."""
    fields = rec.fields
    if name not in fields or fields[name] is None:
        if not required:
            return ""
        what = "missing" if name not in fields else "null"
        raise _fail(source, rec.where, f"{what} field {name!r} (expected fields: {expected})")
    value = fields[name]
    if not isinstance(value, str):
        raise _fail(source, rec.where, f"field {name!r} must be a string, got "
                    f"{type(value).__name__} {value!r:.60} (expected fields: {expected})")
    if required and not value.strip():
        raise _fail(source, rec.where, f"field {name!r} is empty (expected fields: {expected})")
    return value


def _bool(rec: _Rec, source: str, name: str, expected: str) -> bool:
    value = rec.fields[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail(source, rec.where, f"field {name!r} must be true or false, got {value!r:.60} "
                f"(expected fields: {expected})")


# ---------------------------------------------------------------------------------------------
# BeaverTails
# ---------------------------------------------------------------------------------------------

_BT_EXPECTED = ("prompt, response (optional), is_safe, category (optional dict) [hub/jsonl]; or "
                "text, label ('harmful'/'safe'), category (optional repr string) [wizard101]")


def _bt_categories(rec: _Rec, source: str) -> dict[str, bool] | None:
    raw = rec.fields.get("category")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise _fail(source, rec.where, "field 'category' is not a Python-repr dict of "
                        f"category -> bool: {type(e).__name__}") from e
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in raw.items()
    ):
        raise _fail(source, rec.where, f"field 'category' must map category names to true/false, "
                    f"got {raw!r:.80}")
    return raw


def map_beavertails(recs: Iterable[_Rec], source: str, opts: Mapping[str, Any]) -> list[Example]:
    """Rows -> Examples for :func:`load_beavertails` (shared by the file and hub paths)."""
    out = []
    for rec in recs:
        fields = rec.fields
        if "prompt" in fields:
            prompt = _text(rec, source, "prompt", _BT_EXPECTED)
            response = _text(rec, source, "response", _BT_EXPECTED, required=False)
            cats = _bt_categories(rec, source)
            if fields.get("is_safe") is not None:
                is_safe = _bool(rec, source, "is_safe", _BT_EXPECTED)
            elif cats is not None:
                is_safe = not any(cats.values())
            else:
                raise _fail(source, rec.where, "missing field 'is_safe' (and no 'category' to "
                            f"derive it from) (expected fields: {_BT_EXPECTED})")
        elif "text" in fields:
            prompt = _text(rec, source, "text", _BT_EXPECTED)
            response = ""
            label = _text(rec, source, "label", _BT_EXPECTED)
            if label not in ("harmful", "safe"):
                raise _fail(source, rec.where, f"field 'label' must be 'harmful' or 'safe', "
                            f"got {label!r}")
            is_safe = label == "safe"
            cats = _bt_categories(rec, source)
        else:
            raise _fail(source, rec.where, f"missing field 'prompt' (or 'text') "
                        f"(expected fields: {_BT_EXPECTED})")
        if opts["require_response"] and not response.strip():
            raise _fail(source, rec.where, "no response, but require_response is set (prompt-only "
                        "files such as the wizard101 30k_test copy have none); unset "
                        "require_response or use a file with responses")
        if opts["harmful_only"] and is_safe:
            continue
        meta = {"category": [k for k, v in cats.items() if v]} if cats is not None else {}
        out.append(Example(prompt=prompt, response=response, is_harmful=not is_safe,
                           source=source, row=rec.row, meta=meta))
    return out


@register_loader("beavertails")
def load_beavertails(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """BeaverTails QA pairs or prompts (PKU-Alignment, hub ``PKU-Alignment/BeaverTails``).

    Hub/JSONL rows: ``prompt``, optional ``response``, ``is_safe`` (judges the *response*),
    ``category`` dict of 14 flags (keys contain commas). The wizard101 prompt copy of 30k_test has
    ``text``, ``label`` ("harmful"/"safe") and ``category`` as a Python-repr string, parsed with
    ``ast.literal_eval``. Default hub split ``30k_train``. Options: ``harmful_only`` (default
    true: keep unsafe rows), ``require_response`` (default false: if true, every row needs a
    response), ``config`` (hub only). Example: ``is_harmful = not is_safe``,
    ``meta["category"]`` = the true category keys when categories are given.
    """
    opts = _options(spec, "beavertails", {"harmful_only": True, "require_response": False},
                    hub=True)
    source, recs = _records(spec, "beavertails", data_root, default_split="30k_train",
                            config=opts["config"])
    return map_beavertails(recs, source, opts)


# ---------------------------------------------------------------------------------------------
# Refusal / alignment pairs
# ---------------------------------------------------------------------------------------------

_REFUSAL_EXPECTED = "instruction, input (optional), output; or prompt, response"


def map_refusal(recs: Iterable[_Rec], source: str, opts: Mapping[str, Any]) -> list[Example]:
    """Rows -> Examples for :func:`load_refusal`."""
    is_refusal: Callable[[str], bool] | None = None
    if opts["refusals_only"]:
        from hftlab.judges.keyword import contains_refusal

        is_refusal = contains_refusal
    out = []
    for rec in recs:
        if "instruction" in rec.fields:
            prompt = _text(rec, source, "instruction", _REFUSAL_EXPECTED)
            extra = _text(rec, source, "input", _REFUSAL_EXPECTED, required=False)
            if extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            response = _text(rec, source, "output", _REFUSAL_EXPECTED)
        elif "prompt" in rec.fields:
            prompt = _text(rec, source, "prompt", _REFUSAL_EXPECTED)
            response = _text(rec, source, "response", _REFUSAL_EXPECTED)
        else:
            raise _fail(source, rec.where, f"missing field 'instruction' (or 'prompt') "
                        f"(expected fields: {_REFUSAL_EXPECTED})")
        if is_refusal is not None and not is_refusal(response):
            continue
        out.append(Example(prompt=prompt, response=response, is_harmful=False,
                           source=source, row=rec.row))
    return out


@register_loader("refusal")
def load_refusal(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Refusal / alignment pairs: a harmful or sensitive request and a safe answer.

    E.g. Safety-Tuned LLaMAs ``safety_only_data_Instructions.json`` (Alpaca-style
    ``instruction``, ``input`` (empty there), ``output``); ``input`` is appended after a blank line
    when non-empty. Rows with ``prompt`` / ``response`` are accepted too. Default hub split
    ``train``. Options: ``refusals_only`` (default false: keep only responses containing a refusal
    phrase, see ``hftlab.judges.keyword``), ``config`` (hub only). ``is_harmful`` is False (the
    refusal is the safe answer).
    """
    opts = _options(spec, "refusal", {"refusals_only": False}, hub=True)
    source, recs = _records(spec, "refusal", data_root, default_split="train",
                            config=opts["config"])
    return map_refusal(recs, source, opts)


# ---------------------------------------------------------------------------------------------
# AdvBench
# ---------------------------------------------------------------------------------------------

_ADV_EXPECTED = "goal, target (optional)"


def _advbench_csv(path: Path, source: str) -> list[Example]:
    rows = _csv_rows(path, source, delimiter=",")
    if not rows:
        return []
    first = [c.strip() for c in rows[0][0]]
    if first == ["target"]:
        raise DataError(f"{source}: has only a 'target' column (AdvBench harmful_strings: target "
                        "strings, not prompts); the advbench loader needs goal,target rows such "
                        "as harmful_behaviors.csv")
    if first in (["goal", "target"], ["goal"]):
        mode = "pairs" if len(first) == 2 else "goals"
        data = rows[1:]
    else:
        # Header-less. transfer_expriment_behaviors.csv is one goal per line, with two goals
        # holding an unquoted comma; only a file where every row has exactly 2 cells is read as
        # goal,target pairs.
        mode = "pairs" if all(len(cells) == 2 for cells, _ in rows) else "goals"
        data = rows
    out = []
    for i, (cells, line) in enumerate(data):
        where = f"row {i + 1} (line {line})"
        target: str | None = None
        if mode == "pairs":
            if len(cells) != 2:
                raise _fail(source, where, f"expected 2 fields (goal, target), got {len(cells)}")
            goal, target = cells
            if not target.strip():
                raise _fail(source, where,
                            "field 'target' is empty (expected fields: goal, target)")
        else:
            goal = ",".join(cells)
        if not goal.strip():
            raise _fail(source, where, f"field 'goal' is empty (expected fields: {_ADV_EXPECTED})")
        meta = {"target": target} if target is not None else {}
        out.append(Example(prompt=goal, response="", is_harmful=True, source=source, row=i,
                           meta=meta))
    return out


@register_loader("advbench")
def load_advbench(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """AdvBench harmful behaviours (Zou et al. 2023, llm-attacks ``data/advbench``); local only.

    CSV with header ``goal,target`` (harmful_behaviors.csv). Header-less files are detected (first
    row not ``goal,target``): transfer_expriment_behaviors.csv is one goal per line where two
    goals contain an unquoted comma, so the cells are re-joined; a header-less file is read as
    goal,target pairs only if every row has exactly two cells. harmful_strings.csv (``target``
    only) is rejected. Other record formats need ``goal`` (+ optional ``target``). Example:
    ``prompt=goal``, ``is_harmful=True``, ``meta["target"]`` when a target is given (note that
    upstream targets of a few rows are rotated; kept as is).
    """
    _options(spec, "advbench", {}, hub=False)
    source, path = _local_path(spec, "advbench", data_root)
    if _has_suffix(path, ".csv"):
        return _advbench_csv(path, source)
    out = []
    for rec in _read_records(path, source):
        goal = _text(rec, source, "goal", _ADV_EXPECTED)
        meta = {}
        if rec.fields.get("target") is not None:
            meta["target"] = _text(rec, source, "target", _ADV_EXPECTED)
        out.append(Example(prompt=goal, is_harmful=True, source=source, row=rec.row, meta=meta))
    return out


# ---------------------------------------------------------------------------------------------
# Harmful (or harmless) instruction lists
# ---------------------------------------------------------------------------------------------

_HI_EXPECTED = "instruction, category (optional)"


def _safety_tuned_eval(doc: dict[str, Any], source: str, harmful: bool) -> list[Example]:
    instructions = doc.get("instructions")
    if not isinstance(instructions, list):
        raise DataError(f"{source}: expected a JSON list of objects with 'instruction', or an "
                        f"object with an 'instructions' list (Safety-Tuned LLaMAs evaluation "
                        f"format); got an object with keys {sorted(doc)}")
    for key in ("inputs", "tags"):
        extra = doc.get(key)
        if extra not in (None, []) and (not isinstance(extra, list)
                                        or len(extra) != len(instructions)):
            raise DataError(f"{source}: '{key}' must be empty or a list as long as 'instructions' "
                            f"({len(instructions)})")
    inputs = doc.get("inputs") or []
    tags = doc.get("tags") or []
    out = []
    for i, text in enumerate(instructions):
        where = f"instructions[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise _fail(source, where, f"must be a non-empty string, got {text!r:.60}")
        prompt = text
        if inputs:
            extra = inputs[i]
            if not isinstance(extra, str):
                raise _fail(source, f"inputs[{i}]", f"must be a string, got {extra!r:.60}")
            if extra.strip():
                prompt = f"{text}\n\n{extra}"
        meta: dict[str, Any] = {}
        if tags:
            if not isinstance(tags[i], str):
                raise _fail(source, f"tags[{i}]", f"must be a string, got {tags[i]!r:.60}")
            meta["category"] = tags[i]
        out.append(Example(prompt=prompt, is_harmful=harmful, source=source, row=i, meta=meta))
    return out


@register_loader("harmful_instructions")
def load_harmful_instructions(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Prompt-only instruction lists (harmful by default); local only.

    refusal_direction (Arditi et al. 2024) ``dataset/splits/*.json``: a JSON list of objects with
    ``instruction`` and ``category`` (string or null). Safety-Tuned LLaMAs ``evaluation/*.json``:
    a JSON object with an ``instructions`` list of strings, an ``inputs`` list (empty there;
    appended after a blank line when given) and, in I-MaliciousInstructions, ``tags`` (kept as
    ``meta["category"]``). JSON Lines/CSV rows need ``instruction``. Option ``harmful`` (default
    true) sets ``is_harmful``; use ``harmful: false`` for the harmless splits.
    """
    opts = _options(spec, "harmful_instructions", {"harmful": True}, hub=False)
    source, path = _local_path(spec, "harmful_instructions", data_root)
    harmful = opts["harmful"]
    if _has_suffix(path, ".json", ".json.gz"):
        doc = _json_doc(path, source)
        if isinstance(doc, dict):
            return _safety_tuned_eval(doc, source, harmful)
        recs = _json_list_records(doc, source)
    else:
        recs = _read_records(path, source)
    out = []
    for rec in recs:
        prompt = _text(rec, source, "instruction", _HI_EXPECTED)
        category = _text(rec, source, "category", _HI_EXPECTED, required=False)
        meta = {"category": category} if category else {}
        out.append(Example(prompt=prompt, is_harmful=harmful, source=source, row=rec.row,
                           meta=meta))
    return out


# ---------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------

_SST2_EXPECTED = "sentence, label (0/1 or 'negative'/'positive')"
_SST2_LABELS = ("negative", "positive")


def map_sst2(recs: Iterable[_Rec], source: str) -> list[Example]:
    """Rows -> Examples for :func:`load_sst2`."""
    out = []
    for rec in recs:
        sentence = _text(rec, source, "sentence", _SST2_EXPECTED).rstrip()
        if "label" not in rec.fields:
            raise _fail(source, rec.where, f"missing field 'label' (expected fields: "
                        f"{_SST2_EXPECTED})")
        raw = rec.fields["label"]
        word: str | None = None
        if isinstance(raw, int) and not isinstance(raw, bool) and raw in (0, 1):
            word = _SST2_LABELS[raw]
        elif isinstance(raw, str) and raw.strip() in ("0", "1"):
            word = _SST2_LABELS[int(raw.strip())]
        elif isinstance(raw, str) and raw.strip() in _SST2_LABELS:
            word = raw.strip()
        if word is None:
            raise _fail(source, rec.where, f"field 'label' must be 0/1 or 'negative'/'positive', "
                        f"got {raw!r:.40} (the GLUE test split has no labels: -1)")
        out.append(Example(prompt=sentence, response=word, label=word, source=source,
                           row=rec.row))
    return out


@register_loader("sst2")
def load_sst2(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """SST-2 binary sentiment (GLUE; hub e.g. ``stanfordnlp/sst2`` or ``glue`` + config ``sst2``).

    GLUE ``train.tsv``/``dev.tsv``: header ``sentence<TAB>label``, label 0/1, read with
    ``csv.QUOTE_NONE``; every sentence carries a trailing space, which is stripped (also for hub
    rows). Hub rows: ``sentence``, ``label`` (extra ``idx`` ignored), default split ``train``.
    JSON Lines rows may use 0/1 or "negative"/"positive" labels. Options: ``config`` (hub only).
    Example: ``prompt=sentence``, ``response=label=`` "negative"/"positive".
    """
    opts = _options(spec, "sst2", {}, hub=True)
    source, recs = _records(spec, "sst2", data_root, default_split="train", config=opts["config"])
    return map_sst2(recs, source)


# ---------------------------------------------------------------------------------------------
# AG News
# ---------------------------------------------------------------------------------------------

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
_AG_EXPECTED_CSV = "class index (1-4), title, description"
_AG_EXPECTED = "text, label (0-3 or a class name)"


def map_ag_news(recs: Iterable[_Rec], source: str) -> list[Example]:
    """Hub-shaped rows (``text``, ``label`` 0..3) -> Examples for :func:`load_ag_news`."""
    out = []
    for rec in recs:
        text = _text(rec, source, "text", _AG_EXPECTED)
        if "label" not in rec.fields:
            raise _fail(source, rec.where, f"missing field 'label' (expected fields: "
                        f"{_AG_EXPECTED})")
        raw = rec.fields["label"]
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 4:
            name = AG_NEWS_LABELS[raw]
        elif isinstance(raw, str) and raw in AG_NEWS_LABELS:
            name = raw
        else:
            raise _fail(source, rec.where, f"field 'label' must be 0-3 or one of "
                        f"{', '.join(AG_NEWS_LABELS)}, got {raw!r:.40}")
        out.append(Example(prompt=text, response=name, label=name, source=source, row=rec.row))
    return out


def _ag_news_csv(path: Path, source: str) -> list[Example]:
    out = []
    for i, (cells, line) in enumerate(_csv_rows(path, source, delimiter=",")):
        where = f"row {i + 1} (line {line})"
        if len(cells) != 3:
            raise _fail(source, where, f"expected 3 fields ({_AG_EXPECTED_CSV}), got {len(cells)}")
        index, title, description = cells
        if index.strip() not in ("1", "2", "3", "4"):
            raise _fail(source, where, f"class index must be 1-4, got {index!r:.40} (the AG News "
                        f"CSV has no header; expected fields: {_AG_EXPECTED_CSV})")
        for name, value in (("title", title), ("description", description)):
            if not value.strip():
                raise _fail(source, where, f"field {name!r} is empty (expected fields: "
                            f"{_AG_EXPECTED_CSV})")
        label = AG_NEWS_LABELS[int(index) - 1]
        out.append(Example(prompt=f"{title} {description}", response=label, label=label,
                           source=source, row=i))
    return out


@register_loader("ag_news")
def load_ag_news(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """AG News 4-class topics (Zhang et al. 2015 CSV release; hub ``ag_news``).

    CSV: no header, 3 columns: class index "1".."4", title, description; text = title + " " +
    description, with the release's backslash line breaks ("dwindling\\band") left in place, as
    on the hub. Hub (and JSON Lines) rows: ``text``, ``label`` 0..3; default split ``train``.
    Options: ``config`` (hub only). Example: ``prompt=text``, ``response=label=`` one of World,
    Sports, Business, Sci/Tech.
    """
    opts = _options(spec, "ag_news", {}, hub=True)
    if spec.path and not spec.hub:
        source, path = _local_path(spec, "ag_news", data_root)
        if _has_suffix(path, ".csv"):
            return _ag_news_csv(path, source)
        return map_ag_news(_read_records(path, source), source)
    source, recs = _records(spec, "ag_news", data_root, default_split="train",
                            config=opts["config"])
    return map_ag_news(recs, source)


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

_GSM_EXPECTED = "question, answer (ending in '#### <number>')"
_CALC_ANNOTATION = re.compile(r"<<[^<>\n]*>>")


def gsm8k_final_answer(text: str) -> str:
    """Normalise a GSM8K final answer for comparison: commas removed, whitespace stripped."""
    return text.replace(",", "").strip()


def map_gsm8k(recs: Iterable[_Rec], source: str) -> list[Example]:
    """Rows -> Examples for :func:`load_gsm8k`."""
    out = []
    for rec in recs:
        question = _text(rec, source, "question", _GSM_EXPECTED)
        answer = _text(rec, source, "answer", _GSM_EXPECTED)
        head, sep, tail = answer.rpartition("####")
        final = tail.strip()
        if not sep or not final:
            raise _fail(source, rec.where, "field 'answer' has no final '#### <number>' line "
                        f"(expected fields: {_GSM_EXPECTED})")
        response = _CALC_ANNOTATION.sub("", head) + f"The final answer is: {final}"
        out.append(Example(prompt=question, response=response, label=gsm8k_final_answer(final),
                           source=source, row=rec.row))
    return out


@register_loader("gsm8k")
def load_gsm8k(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """GSM8K grade-school maths (Cobbe et al. 2021, openai/grade-school-math; hub ``gsm8k``).

    Rows: ``question``, ``answer`` (worked solution with ``<<48/2=24>>`` calculator annotations,
    ending in ``#### <number>``). The annotations are removed and the final line becomes
    "The final answer is: <number>"; a missing ``####`` is an error. Hub: config ``main`` by
    default (option ``config``, e.g. ``socratic``), default split ``train``. Example:
    ``prompt=question``, ``response`` as above, ``label`` = the number with commas removed.
    """
    opts = _options(spec, "gsm8k", {}, hub=True, config_default="main")
    source, recs = _records(spec, "gsm8k", data_root, default_split="train",
                            config=opts["config"])
    return map_gsm8k(recs, source)


# ---------------------------------------------------------------------------------------------
# Demo pack (shipped inside the package)
# ---------------------------------------------------------------------------------------------


def demo_dir() -> Path:
    """Directory of the demo pack shipped with hftlab (``hftlab/data/demo``)."""
    return Path(str(resources.files("hftlab.data") / "demo"))


_DEMO_HARMFUL = "id, category, prompt, refusal, compliance"


def _demo_records(spec: DataSpec, kind: str, filename: str) -> tuple[str, list[_Rec]]:
    _options(spec, kind, {}, hub=False)
    _require_no_source(spec, kind)
    path = demo_dir() / filename
    if not path.is_file():
        raise DataError(f"demo pack file {path} is missing (needed by kind {kind!r}): the hftlab "
                        "installation is incomplete; reinstall hftlab")
    return str(path), _read_records(path, str(path))


def _demo_harmful(spec: DataSpec, kind: str, response_field: str | None) -> list[Example]:
    source, recs = _demo_records(spec, kind, "harmful.jsonl")
    out = []
    for rec in recs:
        prompt = _text(rec, source, "prompt", _DEMO_HARMFUL)
        category = _text(rec, source, "category", _DEMO_HARMFUL)
        response = _text(rec, source, response_field, _DEMO_HARMFUL) if response_field else ""
        out.append(Example(prompt=prompt, response=response,
                           is_harmful=response_field != "refusal", source=source, row=rec.row,
                           meta={"category": category}))
    return out


@register_loader("demo_refusal", needs_source=False)
def load_demo_refusal(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Demo pack ``harmful.jsonl`` (id, category, prompt, refusal, compliance) as refusal pairs:
    ``response=refusal``, ``is_harmful=False``, ``meta["category"]``. No path/hub/options."""
    return _demo_harmful(spec, "demo_refusal", "refusal")


@register_loader("demo_harmful_qa", needs_source=False)
def load_demo_harmful_qa(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Demo pack ``harmful.jsonl`` as harmful QA pairs: ``response=compliance``,
    ``is_harmful=True``, ``meta["category"]``. No path/hub/options."""
    return _demo_harmful(spec, "demo_harmful_qa", "compliance")


@register_loader("demo_harmful_prompts", needs_source=False)
def load_demo_harmful_prompts(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Demo pack ``harmful.jsonl`` prompts only: ``is_harmful=True``, ``meta["category"]``.
    No path/hub/options."""
    return _demo_harmful(spec, "demo_harmful_prompts", None)


@register_loader("demo_sentiment", needs_source=False)
def load_demo_sentiment(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Demo pack ``sentiment.jsonl`` (sentence, label "positive"/"negative"):
    ``prompt=sentence``, ``response=label=`` the label word. No path/hub/options."""
    source, recs = _demo_records(spec, "demo_sentiment", "sentiment.jsonl")
    return map_sst2(recs, source)


@register_loader("demo_harmless", needs_source=False)
def load_demo_harmless(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """Demo pack ``harmless.jsonl`` (prompt): benign prompts, ``is_harmful=False``.
    No path/hub/options."""
    source, recs = _demo_records(spec, "demo_harmless", "harmless.jsonl")
    return [Example(prompt=_text(rec, source, "prompt", "prompt"), is_harmful=False,
                    source=source, row=rec.row) for rec in recs]
