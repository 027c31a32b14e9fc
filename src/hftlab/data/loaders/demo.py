"""Demo pack kinds (``demo_*``): small files shipped inside the package, no path/hub/options.

The pack's directory comes from :func:`demo_dir`, looked up in this module at call time, so tests
can point the demo kinds elsewhere with ``monkeypatch.setattr(demo, "demo_dir", ...)``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hftlab.data.loaders.core import _options, _require_no_source, register_loader
from hftlab.data.loaders.readers import _read_records, _Rec, _text
from hftlab.data.loaders.tasks import map_sst2
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

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
