"""Where a data set comes from: a loader kind plus a local path or a hub id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataSpec:
    """A data source as written in a config.

    ``kind`` names the loader (see ``hftlab.data.loaders.LOADERS``). Exactly one of ``path``
    (a local file; relative paths are tried against the working directory, then ``data_root``)
    or ``hub`` (a Hugging Face dataset id, with ``split``) is set, except for the ``demo_*``
    kinds, which read the pack shipped inside the package. ``offset`` skips rows and ``n`` keeps
    the next ``n`` (after the loader's own filtering) so that roles can take disjoint slices of one
    file. ``options`` are loader-specific switches (e.g. ``harmful_only``).
    """

    kind: str
    path: str | None = None
    hub: str | None = None
    split: str | None = None
    n: int | None = None
    offset: int = 0
    options: dict[str, Any] = field(default_factory=dict)
