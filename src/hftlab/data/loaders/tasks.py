"""Task data kinds (benign fine-tuning / evaluation tasks): ``sst2``, ``ag_news`` and ``gsm8k``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from hftlab.data.loaders.core import (
    _local_path,
    _options,
    _options_and_records,
    _records,
    register_loader,
)
from hftlab.data.loaders.readers import (
    _csv_rows,
    _fail,
    _has_suffix,
    _read_records,
    _Rec,
    _text,
)
from hftlab.data.records import Example
from hftlab.data.spec import DataSpec

# ---------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------

_SST2_EXPECTED = "sentence, label (0/1 or 'negative'/'positive')"
SST2_LABELS = ("negative", "positive")


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
            word = SST2_LABELS[raw]
        elif isinstance(raw, str) and raw.strip() in ("0", "1"):
            word = SST2_LABELS[int(raw.strip())]
        elif isinstance(raw, str) and raw.strip() in SST2_LABELS:
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
    _, source, recs = _options_and_records(spec, "sst2", data_root, {}, default_split="train")
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
    _, source, recs = _options_and_records(spec, "gsm8k", data_root, {}, default_split="train",
                                           config_default="main")
    return map_gsm8k(recs, source)

