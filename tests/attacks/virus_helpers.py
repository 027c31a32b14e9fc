"""Helpers for the Virus tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from hftlab.attacks import ATTACKS
from hftlab.attacks.virus_surrogate import Surrogate

#: The tiny aligned adapter's targets: q/k/v as the reference's, plus one module for ``params``.
ALIGNED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def virus_surrogate(model_dir: Path, adapter: Path | None, **options) -> Surrogate:
    """A surrogate of the tiny model (judge and judge term do not matter to it)."""
    return ATTACKS.get("virus")(model=str(model_dir), judge="keyword", judge_args={},
                                judge_term="ranking",
                                adapter=None if adapter is None else str(adapter),
                                **options).load_surrogate()
