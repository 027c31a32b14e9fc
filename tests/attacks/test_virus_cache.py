"""Which runs share a Virus search, read from their configs (attacks/virus_cache.py)."""

from __future__ import annotations

import json

from hftlab.attacks import ATTACKS
from hftlab.config import load_config

RANKED = {"judge": "keyword", "judge_term": "ranking"}


def problem(args: dict, *extra: str, alignment: str = "aligned-1") -> dict:
    config = load_config(None, ["attack=virus", f"attack_args={json.dumps(args)}", *extra])
    return ATTACKS.get("virus").search_problem(config, alignment)


def test_runs_that_share_the_cache_share_a_problem() -> None:
    base = problem(RANKED)
    # an option left at its default is the same problem; the defense and the fine-tuning's
    # own settings are not part of it
    assert problem({**RANKED, "steps": 50}) == base
    assert problem(RANKED, "defense=guardrail", "finetune.train.lr=0.001") == base
    # another seed, upload, option or aligned adapter is another problem
    assert problem(RANKED, "seed=1") != base
    assert problem(RANKED, "finetune.poison_ratio=0.2") != base
    assert problem({**RANKED, "steps": 3}) != base
    assert problem(RANKED, alignment="aligned-2") != base


def test_the_alignment_counts_only_where_the_gradient_is_matched_on_it() -> None:
    on_base = {**RANKED, "match_on": "base_weights"}
    assert problem(on_base, alignment="aligned-1") == problem(on_base, alignment="aligned-2")
    named = {**RANKED, "adapter": "adapters/aligned"}
    assert problem(named, alignment="aligned-1") == problem(named, alignment="aligned-2")
    assert problem(named)["aligned_adapter"] == "adapters/aligned"


def test_a_named_surrogate_replaces_the_run_model() -> None:
    surrogate = problem({**RANKED, "model": "models/other"}, "model.revision=main")["surrogate"]
    assert (surrogate["model"], surrogate["revision"]) == ("models/other", None)
    assert problem(RANKED, "model.revision=main")["surrogate"]["revision"] == "main"
