from __future__ import annotations

import contextlib

import pytest
import torch

from hftlab.config import ModelConfig
from hftlab.data.records import Example
from hftlab.evaluate import (
    alpaca_eval_records,
    finetune_accuracy,
    generate,
    harmful_score,
    over_refusal,
)
from hftlab.formatting import PromptFormatter
from hftlab.judges import JUDGES
from hftlab.tasks import TASKS


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, PromptFormatter(tokenizer, ModelConfig())


def test_batched_left_padded_generation_equals_one_by_one(tiny) -> None:
    model, formatter = tiny
    prompts = ["short", "a much longer prompt with many more words in it", "medium length one"]
    args = (8, torch.device("cpu"), contextlib.nullcontext)
    batched = generate(model, formatter, prompts, args[0], 3, *args[1:])
    single = [generate(model, formatter, [p], args[0], 1, *args[1:])[0] for p in prompts]
    assert batched == single
    assert all(isinstance(c, str) for c in batched)


def test_frozen_head_gets_a_contiguous_input_and_the_hook_goes(tiny) -> None:
    # frozen weights + the strided last-position view made matmul copy the head per row
    model, formatter = tiny
    head = model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    seen: list[bool] = []
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        hooks_before = len(head._forward_pre_hooks)
        generate(model, formatter, ["one prompt", "another, longer prompt"], 3, 2,
                 torch.device("cpu"), contextlib.nullcontext)
        assert seen and all(seen)
        assert len(head._forward_pre_hooks) == hooks_before
    finally:
        spy.remove()
        for p in model.parameters():
            p.requires_grad_(True)


def test_scores() -> None:
    judge = JUDGES.get("keyword")()
    hs, flags = harmful_score(judge, ["a", "b"], ["I cannot help.", "Sure: [placeholder]"])
    assert hs == 50.0 and flags == [False, True]
    examples = [Example(prompt="x", response="positive", label="positive"),
                Example(prompt="y", response="negative", label="negative")]
    fa, correct = finetune_accuracy(TASKS["sst2"], examples, ["positive", "positive"])
    assert fa == 50.0 and correct == [True, False]


def test_over_refusal_counts_refusal_phrases() -> None:
    rate, refused = over_refusal(["Sure, here is a poem.", "I'm sorry, I can't do that.",
                                  "I cannot help with that", "Paris."])
    assert refused == [False, True, True, False] and rate == 50.0
    assert over_refusal([]) == (0.0, [])


def test_alpaca_eval_records_have_the_tool_format() -> None:
    rows = [Example(prompt="Name a color.", meta={"dataset": "helpful_base"}),
            Example(prompt="Say hi.")]
    records = alpaca_eval_records(rows, ["Blue.", "Hi!"], "hftlab-sft-final")
    assert records == [
        {"instruction": "Name a color.", "output": "Blue.", "generator": "hftlab-sft-final",
         "dataset": "helpful_base"},
        {"instruction": "Say hi.", "output": "Hi!", "generator": "hftlab-sft-final"},
    ]


def test_pipeline_reports_over_refusal_and_exports_generations(tiny_overrides, tmp_path) -> None:
    from hftlab.config import load_config
    from hftlab.context import RunContext
    from hftlab.pipeline import run_pipeline
    from hftlab.utils import read_json, read_jsonl

    extra = ["eval.harmless={kind: demo_harmless, n: 4}",
             "eval.generations={kind: demo_harmless, offset: 4, n: 3}",
             "eval.generation_max_new_tokens=5"]
    plain_key = RunContext(load_config(None, tiny_overrides), tmp_path / "a").eval_key()
    config = load_config(None, [*tiny_overrides, *extra])
    assert RunContext(config, tmp_path / "b").eval_key() != plain_key
    metrics = run_pipeline(config, tmp_path / "b")
    assert metrics["n_eval_harmless"] == 4
    assert 0 <= metrics["over_refusal"] <= 100
    assert metrics["aligned.over_refusal"] is not None
    # the task's prompts answered with a refusal phrase, for every evaluated model
    for model in ("base", "aligned"):
        assert 0 <= metrics[f"{model}.task_refusal"] <= 100
    task_rows = [r for r in read_jsonl(tmp_path / "b" / "eval" / "completions.jsonl")
                 if r["set"] not in ("harmful", "harmless")]
    assert task_rows and all(isinstance(r["refused"], bool) for r in task_rows)
    assert metrics["task_refusal"] == round(
        100.0 * sum(r["refused"] for r in task_rows) / len(task_rows), 2)
    low, high = metrics["over_refusal_ci95"]
    assert low <= metrics["over_refusal"] <= high
    rows = read_jsonl(tmp_path / "b" / "eval" / "completions.jsonl")
    harmless = [r for r in rows if r["set"] == "harmless"]
    assert len(harmless) == 4 and all(isinstance(r["refused"], bool) for r in harmless)
    exported = read_json(tmp_path / "b" / metrics["alpaca_eval_outputs"])
    assert len(exported) == 3
    assert {"instruction", "output", "generator"} <= set(exported[0])
    assert exported[0]["generator"] == "hftlab-sft-final"


def test_evaluation_version_enters_the_eval_key_only_when_bumped(
    tiny_overrides, tmp_path, monkeypatch
) -> None:
    import hftlab.evaluate
    from hftlab.config import load_config
    from hftlab.context import RunContext

    def key() -> str:
        return RunContext(load_config(None, tiny_overrides), tmp_path).eval_key()

    monkeypatch.setattr(hftlab.evaluate, "EVALUATION_VERSION", 0)
    unversioned = key()
    monkeypatch.setattr(hftlab.evaluate, "EVALUATION_VERSION", 1)
    assert key() != unversioned
