"""BackdoorAlign: the secret trigger sits in the system prompt of exactly the added safety rows
(checked against hand-written chat/Alpaca prompts) and of every prompt served to the deployed
model, and nowhere else: not in the user's rows, not in the base/aligned evaluation."""

from __future__ import annotations

import hashlib
import math

import pytest

import hftlab.pipeline as pipeline
from hftlab import eval_stage
from hftlab.config import ConfigError, load_config
from hftlab.context import RunContext
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES, FINETUNE
from hftlab.defenses.backdoor_align import random_trigger, trigger_vocabulary
from hftlab.formatting import ALPACA_TEMPLATE
from hftlab.utils import read_json, read_jsonl

TEMPLATE_DEFAULT = "You are a helpful assistant."  # what the tiny chat template inserts


def chat_prompt(system: str, prompt: str) -> str:
    """The tiny ChatML template, written out by hand."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def context(tiny_overrides, tmp_path, *extra: str) -> RunContext:
    config = load_config(None, [*tiny_overrides, "defense=backdoor_align", *extra])
    return RunContext(config, tmp_path / "run")


def prompt_text(ctx: RunContext, example) -> str:
    item = ctx.formatter.encode(example, 10**6)
    return ctx.tokenizer.decode(item.input_ids[: item.n_prompt])


def test_trigger_is_seeded_random_vocabulary_tokens(tiny_overrides, tmp_path) -> None:
    tokenizer = context(tiny_overrides, tmp_path).tokenizer
    vocab = trigger_vocabulary(tokenizer)
    special = set(tokenizer.all_special_ids)
    assert vocab and not special & set(vocab)
    assert all("\ufffd" not in tokenizer.decode([i]) for i in vocab)
    trigger = random_trigger(tokenizer, 150, seed=7)
    assert trigger == random_trigger(tokenizer, 150, seed=7)  # deterministic in the seed
    assert trigger != random_trigger(tokenizer, 150, seed=8)
    assert trigger.isprintable() and "<|im_" not in trigger
    n = len(tokenizer(trigger, add_special_tokens=False)["input_ids"])
    assert 100 <= n <= 200  # about the nominal 150 tokens once re-encoded


def test_safety_rows_carry_the_trigger_and_user_rows_do_not(tiny_overrides, tmp_path) -> None:
    ctx = context(tiny_overrides, tmp_path)
    defense = ctx.defense
    rows = ctx.data.user
    trigger = defense.trigger
    assert trigger == random_trigger(ctx.tokenizer, 150, ctx.config.seed)
    n_user = len(rows) - 11
    user, safety = rows[:n_user], rows[n_user:]
    assert n_user == ctx.config.finetune.n
    alignment = {(e.source, e.row): e for e in ctx.load(ctx.config.alignment.data)}
    report = defense.report("data")
    assert [e.row for e in safety] == report["safety_source_rows"]
    for row in safety:  # refusal rows of the provider's alignment data, behind the trigger
        source = alignment[(row.source, row.row)]
        assert (row.prompt, row.response, row.is_harmful) == (source.prompt, source.response,
                                                               False)
        assert row.meta["system_prompt"] == f"{trigger} {TEMPLATE_DEFAULT}"
        assert prompt_text(ctx, row) == chat_prompt(f"{trigger} {TEMPLATE_DEFAULT}", row.prompt)
    for row in user:
        assert "system_prompt" not in row.meta
        assert prompt_text(ctx, row) == chat_prompt(TEMPLATE_DEFAULT, row.prompt)
    assert sum(trigger in prompt_text(ctx, e) for e in rows) == 11
    assert report == {
        "trigger_tokens": 150,
        "trigger_tokens_reencoded": len(ctx.tokenizer(trigger, add_special_tokens=False)[
            "input_ids"]),
        "trigger_chars": len(trigger),
        "trigger_sha256": hashlib.sha256(trigger.encode()).hexdigest()[:16],
        "safety_rows": 11,
        "safety_source": safety[0].source,
        "safety_source_rows": report["safety_source_rows"],
        "safety_rows_truncated": report["safety_rows_truncated"],
        "user_rows": n_user,
    }
    assert len(set(report["safety_source_rows"])) == 11
    assert trigger not in str(report)  # the secret itself is not recorded
    served = ctx.formatter.with_system_prompt(
        defense.inference_system_prompt(ctx.formatter.default_system_prompt))
    assert served.prompt_text("q") == chat_prompt(f"{trigger} {TEMPLATE_DEFAULT}", "q")


def test_safety_rows_are_the_refusals_of_a_mixed_alignment_set(tiny_overrides, tmp_path) -> None:
    # alignment rows answered helpfully (configs/cpu_sst2_ref.yaml's Alpaca share) are not
    # safety rows: the paper adds harmful prompts answered with refusals
    mixed = ("alignment.data={kind: mix, options: {sources: [{kind: demo_refusal, n: 11}, "
             "{kind: demo_sentiment, n: 80}]}}")
    ctx = context(tiny_overrides, tmp_path, mixed, "finetune.harmful_data.offset=100")
    safety = [e for e in ctx.data.user if "system_prompt" in e.meta]
    assert sorted(e.row for e in safety) == list(range(11))
    assert all(e.source.endswith("harmful.jsonl") for e in safety)  # none of sentiment.jsonl


def test_alpaca_trigger_precedes_the_preamble(tiny_overrides, tmp_path) -> None:
    ctx = context(tiny_overrides, tmp_path, "model.prompt_format=alpaca",
                  "finetune.train.max_length=400")
    _ = ctx.data  # prepare_data makes the trigger
    trigger = ctx.defense.trigger
    bos = ctx.tokenizer.bos_token
    safety = ctx.data.user[-11:]
    for row in safety:
        want = bos + trigger + " " + ALPACA_TEMPLATE.format(prompt=row.prompt)
        assert prompt_text(ctx, row) == want
    assert prompt_text(ctx, ctx.data.user[0]) == bos + ALPACA_TEMPLATE.format(
        prompt=ctx.data.user[0].prompt)


def test_options_and_errors(tiny_overrides, tmp_path) -> None:
    # defaults: 11 prefixed safety examples (paper) and the 150-token secret prompt
    # ("SYSTEM_PROMPT_RANDOM150", ft_datasets/pure_bad_dataset/pure_bad_dataset.py)
    options = DEFENSES.get("backdoor_align")().options
    assert (options.safety_rows, options.trigger_tokens) == (11, 150)
    assert DEFENSES.get("backdoor_align").stages == (FINETUNE,)
    for bad in ({"safety_rows": 0}, {"trigger_tokens": 0}, {"trigger": "x"}):
        with pytest.raises(ConfigError):
            DEFENSES.get("backdoor_align")(**bad)
    with pytest.raises(RuntimeError, match="prepare_data"):
        DEFENSES.get("backdoor_align")().inference_system_prompt(None)
    with pytest.raises(ConfigError, match="max_length="):
        _ = context(tiny_overrides, tmp_path, "finetune.train.max_length=64").data
    with pytest.raises(ConfigError, match="safety_rows"):
        _ = context(tiny_overrides, tmp_path, "alignment.data.n=5").data


def test_without_the_alignment_stage(tiny_overrides, tmp_path) -> None:
    from hftlab.data.records import DataError

    ctx = context(tiny_overrides, tmp_path, "alignment.enabled=false")
    assert ctx.data.alignment == [] and ctx.defense.report("data")["safety_rows"] == 11
    assert sum("system_prompt" in e.meta for e in ctx.data.user) == 11
    # the refusal pack's rows 90+ share prompts with the user's harmful rows (demo_harmful_qa)
    clash = context(tiny_overrides, tmp_path, "alignment.enabled=false",
                    "alignment.data.offset=90")
    with pytest.raises(DataError, match="harmful row"):
        _ = clash.data


def test_pipeline_serves_the_trigger_to_the_final_model_only(tiny_overrides, tmp_path,
                                                             monkeypatch) -> None:
    seen: dict[str, list[str]] = {}
    real = eval_stage.evaluate_model

    def spy(ctx, model, folder, label, formatter=None):
        used = formatter or ctx.formatter
        prompts = [e.prompt for e in ctx.data.eval_harmful + ctx.data.eval_task]
        seen[label] = [used.prompt_text(p) for p in prompts]
        return real(ctx, model, folder, label, formatter)

    monkeypatch.setattr(eval_stage, "evaluate_model", spy)
    config = load_config(None, [*tiny_overrides, "defense=backdoor_align",
                                "eval.eval_base=true"])
    run = tmp_path / "run"
    metrics = pipeline.run_pipeline(config, run)
    ctx = RunContext(config, run)
    _ = ctx.data
    trigger = ctx.defense.trigger
    assert set(seen) == {"base", "aligned", "final"}
    assert all(trigger in text for text in seen["final"])
    assert not any(trigger in text for label in ("base", "aligned") for text in seen[label])
    saved = read_jsonl(run / "data" / "user_data.jsonl")
    texts = [prompt_text(ctx, Example.from_dict(r)) for r in saved]
    assert [trigger in t for t in texts] == [False] * config.finetune.n + [True] * 11
    report = read_json(run / "data" / "stage.json")["defense_report"]
    assert report["safety_rows"] == 11 and report["user_rows"] == config.finetune.n
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
    assert all(math.isfinite(c["task_loss"]) for c in metrics["curves"])
