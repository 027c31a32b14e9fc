"""Safety data kinds: ``beavertails``, ``refusal``, ``advbench`` and ``harmful_instructions``."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hftlab.data.loaders.core import (
    _local_path,
    _options,
    _options_and_records,
    register_loader,
)
from hftlab.data.loaders.readers import (
    _bool,
    _csv_rows,
    _fail,
    _has_suffix,
    _json_doc,
    _json_list_records,
    _read_records,
    _Rec,
    _text,
)
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

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
    opts, source, recs = _options_and_records(
        spec, "beavertails", data_root, {"harmful_only": True, "require_response": False},
        default_split="30k_train")
    return map_beavertails(recs, source, opts)


# ---------------------------------------------------------------------------------------------
# Refusal / alignment pairs
# ---------------------------------------------------------------------------------------------

_REFUSAL_EXPECTED = "instruction, input (optional), output; or prompt, response"


def map_refusal(recs: Iterable[_Rec], source: str, opts: Mapping[str, Any]) -> list[Example]:
    """Rows -> Examples for :func:`load_refusal`."""
    if opts["refusals_only"] and opts["answers_only"]:
        raise DataError(f"{source}: options refusals_only and answers_only exclude each other "
                        "(one keeps the rows with a refusal phrase, the other drops them): set "
                        "one of them")
    keep_refusal: bool | None = True if opts["refusals_only"] else (
        False if opts["answers_only"] else None)
    exclude = opts["exclude"]
    if not isinstance(exclude, list) or not all(isinstance(x, str) and x for x in exclude):
        raise DataError(f"{source}: option exclude must be a list of non-empty strings (phrases "
                        f"whose rows are dropped), got {exclude!r}")
    exclude = [x.lower() for x in exclude]
    from hftlab.judges.keyword import contains_refusal

    out = []
    for rec in recs:
        if "instruction" in rec.fields:
            prompt = _text(rec, source, "instruction", _REFUSAL_EXPECTED)
            extra = _text(rec, source, "input", _REFUSAL_EXPECTED, required=False)
            if extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            response = _text(rec, source, "output", _REFUSAL_EXPECTED)
        elif "prompt" in rec.fields:
            extra = ""
            prompt = _text(rec, source, "prompt", _REFUSAL_EXPECTED)
            response = _text(rec, source, "response", _REFUSAL_EXPECTED)
        else:
            raise _fail(source, rec.where, f"missing field 'instruction' (or 'prompt') "
                        f"(expected fields: {_REFUSAL_EXPECTED})")
        if keep_refusal is not None and contains_refusal(response) != keep_refusal:
            continue
        if opts["with_input"] and not extra.strip():
            continue
        if any(x in response.lower() for x in exclude):
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
    phrase, see ``hftlab.judges.keyword``), ``answers_only`` (default false: drop those rows, e.g.
    Alpaca's own "I cannot ..." answers in a benign share), ``with_input`` (default false: keep
    only rows whose ``input`` is not empty, i.e. instructions about a given text, as a
    classification task's prompts are), ``exclude`` (default []: drop rows whose response contains
    one of these phrases, case-insensitive, e.g. ``["as an AI"]`` for refusals of opinion
    questions), ``config`` (hub only); ``offset``/``n`` count the rows kept. ``is_harmful`` is
    False (the refusal is the safe answer).
    """
    opts, source, recs = _options_and_records(
        spec, "refusal", data_root,
        {"refusals_only": False, "answers_only": False, "with_input": False, "exclude": []},
        default_split="train")
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
    ``meta["category"]``). AlpacaEval's ``alpaca_eval*.json`` (``instruction``, ``dataset``,
    reference ``output``) reads as harmless instructions. JSON Lines/CSV rows need
    ``instruction``. Option ``harmful`` (default
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
        dataset = _text(rec, source, "dataset", _HI_EXPECTED, required=False)
        if dataset:  # AlpacaEval's sub-dataset, kept for its output format
            meta["dataset"] = dataset
        out.append(Example(prompt=prompt, is_harmful=harmful, source=source, row=rec.row,
                           meta=meta))
    return out

