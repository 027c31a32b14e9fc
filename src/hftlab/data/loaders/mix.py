"""The ``mix`` kind: several data sources as one set, e.g. alignment data that pairs refusals
with benign answered instructions (so the aligned model still answers benign tasks)."""

from __future__ import annotations

from pathlib import Path

from hftlab.data.loaders.core import _options, load_examples, register_loader
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec


@register_loader("mix", needs_source=False)
def load_mix(spec: DataSpec, data_root: Path | None) -> list[Example]:
    """The rows of every spec in ``options.sources``, in the order listed (each source's own
    ``offset`` / ``n`` apply first; the mix's ``offset`` / ``n`` then apply to the whole).
    Training shuffles, so the order only decides which rows a mix-level ``n`` keeps."""
    from hftlab.config import ConfigError, build

    opts = _options(spec, "mix", {"sources": None}, hub=False)
    sources = opts["sources"]
    if not isinstance(sources, list) or not sources:
        raise DataError("data kind 'mix': options.sources must be a non-empty list of data "
                        "specs, e.g. [{kind: refusal, path: A.json}, {kind: refusal, path: B}]")
    rows: list[Example] = []
    for index, raw in enumerate(sources):
        if not isinstance(raw, dict):
            raise DataError(f"data kind 'mix': options.sources[{index}] must be a data spec "
                            f"mapping, got {raw!r}")
        try:
            source = build(DataSpec, raw, where="data kind 'mix'",
                           prefix=f"options.sources[{index}].")
        except ConfigError as exc:
            raise DataError(str(exc)) from exc
        if source.kind == "mix":
            raise DataError("data kind 'mix': a source cannot itself be a mix; list its "
                            "sources instead")
        rows.extend(load_examples(source, data_root))
    return rows
