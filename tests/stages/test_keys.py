"""The stages' cache keys, pinned: every value was computed by the code before the stages were
modules of their own (and matches ``RunContext``'s keys), so the caches made then stay valid.
A change here needs a bumped ``KEY_VERSION`` (and misses every existing cache entry)."""

from __future__ import annotations

import pytest

from hftlab.attacks.base import PROMPT_PROBE
from hftlab.config import load_config
from hftlab.context import RunContext
from hftlab.stages import STAGES, Stage, versioned_key
from hftlab.stages.align import align_inputs
from hftlab.stages.eval import base_key, eval_inputs, served_fields, served_key, variant_key
from hftlab.stages.finetune import finetune_inputs
from hftlab.utils import stable_hash

HARMFUL_QA = "provider_harmful={kind: demo_harmful_qa, n: 16}"
TAR_ARGS = "defense_args={inner_steps: 2, tr_every: 1, retain_data: {kind: demo_sentiment, n: 12}}"
CASES = {
    "sft": [],
    "booster": ["defense=booster", HARMFUL_QA],
    "tar": ["defense=tar", TAR_ARGS, HARMFUL_QA],
    "no_alignment": ["alignment.enabled=false"],
    "backdoor": ["attack=backdoor"],
    "identity_shift": ["attack=identity_shift", "eval.harmless={kind: demo_harmless, n: 4}",
                       "eval.generations={kind: demo_harmless, offset: 4, n: 3}",
                       "eval.hs_plus=true"],
    "antidote": ["defense=antidote", HARMFUL_QA],
}
SFT_ALIGNMENT, EVAL, BASE, SERVED = ("8106b619580e64d3", "da2cb3c05d9ea693",
                                     "286ed0236446b1f4", "c5621511ac956cec")
PINNED = {
    "sft": (SFT_ALIGNMENT, SFT_ALIGNMENT, "ac1f9dba87cc2873", EVAL, SERVED, {}),
    "booster": ("4c9f5864b147de1b", SFT_ALIGNMENT, "615a6cf787cb5431", EVAL, SERVED, {}),
    "tar": ("3331defb23d18570", SFT_ALIGNMENT, "96b7d3e01d539149", EVAL, SERVED, {}),
    "no_alignment": ("ad128a7c4c69f598", "ad128a7c4c69f598", "b7a020325fce2aa6", EVAL, SERVED,
                     {}),
    "backdoor": (SFT_ALIGNMENT, SFT_ALIGNMENT, "2d793ae00ed595a2", EVAL, SERVED,
                 {"triggered": "a08509842cb3db3a"}),
    "identity_shift": (SFT_ALIGNMENT, SFT_ALIGNMENT, "da182ccec44e5d70", "cb703d102b8c0ef3",
                       "d7ffe3a9e17163f1", {}),
    "antidote": (SFT_ALIGNMENT, SFT_ALIGNMENT, "17e8b8671ed7ae29", EVAL, SERVED, {}),
}


def pinned_context(tiny_overrides: list[str], tmp_path, extra: list[str]) -> RunContext:
    ctx = RunContext(load_config(None, [*tiny_overrides, *extra]), tmp_path / "run")
    ctx.model_path = "pinned/tiny"  # the keys name the model; the test model's folder varies
    return ctx


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_keys_are_the_pinned_values(case, tiny_overrides, tmp_path) -> None:
    ctx = pinned_context(tiny_overrides, tmp_path, CASES[case])
    alignment, start, finetune, ev, served, variants = PINNED[case]
    assert align_inputs(ctx).key() == ctx.alignment_key() == alignment
    assert align_inputs(ctx, start=True).key() == ctx.alignment_key(start=True) == start
    assert finetune_inputs(ctx).key() == ctx.finetune_key() == finetune
    assert eval_inputs(ctx).key() == ctx.eval_key() == ev
    assert base_key(ctx.model_key()) == BASE
    attack = ctx.attack
    system = ctx.defense.inference_system_prompt(
        attack.served_system_prompt(ctx.formatter.default_system_prompt))
    rewrites = attack.served_prompt(PROMPT_PROBE) != PROMPT_PROBE
    prompt_key = attack.serving_key() if rewrites else None
    assert served_key(ev, system, prompt_key) == served
    fields = served_fields(ev, system, prompt_key)
    assert {name: variant_key(fields, attack.serving_key(), name, variant)
            for name, variant in attack.eval_variants().items()} == variants


def test_finetune_key_reads_the_rows_the_data_stage_saved(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_stage, stage_data

    ctx = pinned_context(tiny_overrides, tmp_path, [])
    run_stage(ctx, Stage.DATA, stage_data, ctx.config.seed)
    inputs = finetune_inputs(pinned_context(tiny_overrides, tmp_path, []))
    assert inputs.key() == PINNED["sft"][2]  # the file's rows: the same key as in memory
    assert [e.to_dict() for e in inputs.user] == [e.to_dict() for e in ctx.data.user]


def test_version_one_is_the_unversioned_hash_and_a_bump_changes_it() -> None:
    fields = {"a": 1}
    assert versioned_key(fields, 1) == stable_hash(fields)[:16]
    assert versioned_key(fields, 2) != versioned_key(fields, 1)


def test_one_stage_enum_names_folders_and_hooks() -> None:
    assert STAGES == ("data", "align", "finetune", "post_finetune", "eval")
    assert [s.hook for s in STAGES] == ["data", "alignment", "finetune", "post_finetune", "eval"]
    assert Stage.of_hook("alignment") is Stage.ALIGN
    assert Stage.of_hook("post_finetune") is Stage.REPAIR
    with pytest.raises(ValueError):
        Stage.of_hook("align_stage")
