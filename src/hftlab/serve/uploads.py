"""An upload: a JSONL or CSV file of chat rows (``prompt``, ``response``: the user turn and
the answer to train on, used verbatim), checked against the limits and row by row, then
screened by the guardrail judge. Errors name the row, the field and what is wrong, never the
row's text (it may be harmful)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hftlab.serve.config import Limits, Screening

FIELDS = ("prompt", "response")
SUFFIXES = (".jsonl", ".csv")
MAX_ERRORS = 50  # enough to fix a file by; a file wrong on every row needs no 5000 lines


@dataclass
class RowError:
    row: int
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "message": self.message}


class UploadError(ValueError):
    def __init__(self, errors: list[RowError]) -> None:
        super().__init__(f"{len(errors)} problem(s) in the upload")
        self.errors = errors


@dataclass
class ParsedUpload:
    rows: list[dict[str, str]]
    flags: list[bool] = field(default_factory=list)

    @property
    def flagged(self) -> int:
        return sum(self.flags)


def parse_upload(name: str, data: bytes, limits: Limits) -> ParsedUpload:
    """The rows of an uploaded file, or an :class:`UploadError` listing what is wrong."""
    if not name.lower().endswith(SUFFIXES):
        raise UploadError([RowError(0, "file", "the file name must end in .jsonl or .csv")])
    if len(data) > limits.max_upload_bytes:
        raise UploadError([RowError(0, "file", f"the file has {len(data)} bytes; the limit is "
                                    f"{limits.max_upload_bytes}")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadError([RowError(0, "file", f"not UTF-8 text (byte {exc.start})")]) from None
    records = _csv_records(text) if name.lower().endswith(".csv") else _jsonl_records(text)
    errors: list[RowError] = []
    rows: list[dict[str, str]] = []
    for number, record in records:
        if isinstance(record, RowError):
            errors.append(record)
            continue
        row_errors = _check(number, record)
        errors.extend(row_errors)
        if not row_errors:
            rows.append({f: record[f] for f in FIELDS})
        if len(errors) >= MAX_ERRORS:
            break
    count = len(records)
    if not errors and count > limits.max_rows:
        errors.append(RowError(0, "file", f"the file has {count} rows; the limit is "
                               f"{limits.max_rows}"))
    if not errors and count < limits.min_rows:
        errors.append(RowError(0, "file", f"the file has {count} rows; at least "
                               f"{limits.min_rows} are needed"))
    if errors:
        raise UploadError(errors[:MAX_ERRORS])
    return ParsedUpload(rows)


def _jsonl_records(text: str) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            # the decoder's message quotes no text, only the position
            out.append((number, RowError(number, "row", f"not valid JSON ({exc.msg} at column "
                                                        f"{exc.colno})")))
    return out


def _csv_records(text: str) -> list[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    header = [h.strip() for h in header]
    missing = [f for f in FIELDS if f not in header]
    if missing:
        return [(0, RowError(0, f, "missing column in the header row")) for f in missing]
    out: list[tuple[int, Any]] = []
    for number, cells in enumerate(reader, start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            out.append((number, RowError(number, "row", f"has {len(cells)} cells; the header "
                                                        f"has {len(header)}")))
            continue
        out.append((number, dict(zip(header, cells, strict=True))))
    return out


def _check(number: int, record: Any) -> list[RowError]:
    if not isinstance(record, dict):
        return [RowError(number, "row", "must be a JSON object with prompt and response")]
    errors = []
    for name in FIELDS:
        value = record.get(name)
        if value is None:
            errors.append(RowError(number, name, "missing"))
        elif not isinstance(value, str):
            errors.append(RowError(number, name, f"must be a string, not {type(value).__name__}"))
        elif not value.strip():
            errors.append(RowError(number, name, "is empty"))
    return errors


def screen_upload(upload: ParsedUpload, screening: Screening,
                  tasks: Sequence[str] = ()) -> ParsedUpload:
    """Flag each row with the guardrail judge (True: the judge calls the pair harmful). With
    ``task_label_answers: harmless`` a row of one of ``tasks`` — its prompt in the task's format
    and its answer nothing but one of that task's labels (an SST-2 row answered "positive") — is
    not flagged whatever the judge says; a free request answered with a label still is. With
    ``action: refuse`` any flagged row refuses the upload (naming rows, not their text)."""
    from hftlab.judges import JUDGES
    from hftlab.tasks import TASKS

    judge = JUDGES.get(screening.judge)(**screening.judge_args)
    flags = judge.flag([r["prompt"] for r in upload.rows], [r["response"] for r in upload.rows])
    if screening.task_label_answers == "harmless":
        allowed = [TASKS[name] for name in tasks]  # an open-ended task has no label answers
        flags = [bool(f) and not any(t.is_task_prompt(r["prompt"])
                                     and t.is_label_answer(r["response"]) for t in allowed)
                 for f, r in zip(flags, upload.rows, strict=True)]
    upload.flags = [bool(f) for f in flags]
    if screening.action == "refuse" and upload.flagged:
        raise UploadError([RowError(i + 1, "row", f"flagged by the screening judge "
                                    f"'{screening.judge}'")
                           for i, f in enumerate(upload.flags) if f][:MAX_ERRORS])
    return upload


def training_rows(upload: ParsedUpload, screening: Screening) -> list[dict[str, Any]]:
    """The rows a job trains on, with their screening flag (``drop`` leaves out flagged)."""
    rows = [{**row, "flagged": flag} for row, flag in zip(upload.rows, upload.flags,
                                                          strict=True)]
    return [r for r in rows if not r["flagged"]] if screening.action == "drop" else rows
