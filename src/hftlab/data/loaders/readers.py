"""Record readers: raw rows of local files (by suffix) and hub splits, plus field validation.

Local files are read by suffix: ``.json`` (a list of objects), ``.jsonl``, ``.jsonl.gz`` (gzipped
JSON Lines), ``.json.gz`` (a gzipped ``.json`` document), ``.csv`` / ``.tsv`` (first row is the
header; ``.tsv`` is read with ``csv.QUOTE_NONE``) and ``.parquet`` (needs ``pyarrow``). Hub splits
are read with ``datasets.load_dataset`` (imported only when used). Each row becomes a
:class:`_Rec` carrying its 0-based data-row index and a human location (``line N``,
``row N (line L)`` or ``index i``) that error messages name.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hftlab.data.records import DataError

_RECORD_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".csv", ".tsv", ".parquet")


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

