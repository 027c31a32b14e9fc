from __future__ import annotations

import contextlib

import pytest
import torch

from hftlab.config import ModelConfig
from hftlab.data.records import Example
from hftlab.evaluate import finetune_accuracy, generate, harmful_score
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


def test_scores() -> None:
    judge = JUDGES.get("keyword")()
    hs, flags = harmful_score(judge, ["a", "b"], ["I cannot help.", "Sure: [placeholder]"])
    assert hs == 50.0 and flags == [False, True]
    examples = [Example(prompt="x", response="positive", label="positive"),
                Example(prompt="y", response="negative", label="negative")]
    fa, correct = finetune_accuracy(TASKS["sst2"], examples, ["positive", "positive"])
    assert fa == 50.0 and correct == [True, False]
