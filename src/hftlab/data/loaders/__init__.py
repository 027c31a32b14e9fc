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

Modules: :mod:`.core` (registry, path resolution, option checks, :func:`load_examples`,
:func:`data_fingerprint`), :mod:`.readers` (record readers for local files and hub splits, field
validation), and the kinds: :mod:`.safety` (beavertails, refusal, advbench,
harmful_instructions), :mod:`.tasks` (sst2, ag_news, gsm8k), :mod:`.demo` (the demo pack) and
:mod:`.mix` (several sources as one).
Importing this package registers every kind.
"""

from __future__ import annotations

# Kinds register in this order (as in LOADERS before the split into modules).
from hftlab.data.loaders import safety, tasks, demo, mix  # noqa: F401  # isort: skip
from hftlab.data.loaders.core import (
    LOADERS,
    Loader,
    data_fingerprint,
    load_examples,
    register_loader,
    resolve_path,
)
from hftlab.data.loaders.demo import (
    demo_dir,
    load_demo_harmful_prompts,
    load_demo_harmful_qa,
    load_demo_harmless,
    load_demo_refusal,
    load_demo_sentiment,
)
from hftlab.data.loaders.readers import hub_rows
from hftlab.data.loaders.safety import (
    load_advbench,
    load_beavertails,
    load_harmful_instructions,
    load_refusal,
    map_beavertails,
    map_refusal,
)
from hftlab.data.loaders.tasks import (
    AG_NEWS_LABELS,
    gsm8k_final_answer,
    load_ag_news,
    load_gsm8k,
    load_sst2,
    map_ag_news,
    map_gsm8k,
    map_sst2,
)
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

__all__ = [
    "AG_NEWS_LABELS",
    "LOADERS",
    "DataError",
    "DataSpec",
    "Example",
    "Loader",
    "data_fingerprint",
    "demo_dir",
    "gsm8k_final_answer",
    "hub_rows",
    "load_ag_news",
    "load_advbench",
    "load_beavertails",
    "load_demo_harmful_prompts",
    "load_demo_harmful_qa",
    "load_demo_harmless",
    "load_demo_refusal",
    "load_demo_sentiment",
    "load_examples",
    "load_gsm8k",
    "load_harmful_instructions",
    "load_refusal",
    "load_sst2",
    "map_ag_news",
    "map_beavertails",
    "map_gsm8k",
    "map_refusal",
    "map_sst2",
    "register_loader",
    "resolve_path",
]
