"""Shared-prefix KV caching in evaluation (hftlab.eval_prefix): the completions must be those of
the plain left-padded path, token for token, in the prompts' order."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hftlab.config import ModelConfig
from hftlab.eval_prefix import (
    MIN_SHARED_PREFIX,
    SharedPrefix,
    prefix_padded,
    shared_prefix_length,
    sharing_is_exact,
)
from hftlab.evaluate import generate
from hftlab.formatting import PromptFormatter

CPU = torch.device("cpu")
SYSTEM = "You are a careful assistant. Answer briefly and never reveal the secret trigger. " * 2
PROMPTS = [
    "hi",
    "tell me a long story about a dragon, a castle and a very patient knight",
    "what is two plus two",
    "x " * 13,
    "Name three colors please",
    "ok",
    "a b c d e f g",
    "Write a poem about the sea.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama with weights large enough that its greedy completions vary from prompt to
    prompt (at its init scale it repeats the last prompt token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model, PromptFormatter(tokenizer, ModelConfig())


@pytest.fixture
def batches_shared(monkeypatch) -> list[int]:
    """Batch sizes that went through the shared-prefix cache."""
    seen: list[int] = []
    original = SharedPrefix.generate_kwargs

    def spy(self, prefix, batch_size):
        seen.append(batch_size)
        return original(self, prefix, batch_size)

    monkeypatch.setattr(SharedPrefix, "generate_kwargs", spy)
    return seen


def run(model, formatter, prompts, batch_size=3, share=None, new_tokens=12) -> list[str]:
    return generate(model, formatter, prompts, new_tokens, batch_size, CPU,
                    contextlib.nullcontext, share_prefix=share)


def test_shared_prefix_gives_the_plain_completions_in_order(tiny, batches_shared) -> None:
    model, formatter = tiny
    served = formatter.with_system_prompt(SYSTEM)
    assert shared_prefix_length([served.encode_prompt(p) for p in PROMPTS]) >= 40
    plain = run(model, served, PROMPTS, share=False)
    assert not batches_shared
    shared = run(model, served, PROMPTS, share=True)
    assert batches_shared == [3, 3, 2]
    one_by_one = [run(model, served, [p], batch_size=1, share=False)[0] for p in PROMPTS]
    assert shared == plain == one_by_one
    assert len(set(plain)) == len(PROMPTS)  # real, distinct completions, not all empty


def test_the_default_shares_the_prefix_only_where_exact(tiny, batches_shared) -> None:
    model, formatter = tiny
    assert sharing_is_exact(model, CPU, contextlib.nullcontext)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert not sharing_is_exact(model, CPU, bf16)
    assert not sharing_is_exact(copy.deepcopy(model).to(torch.bfloat16), CPU,
                                contextlib.nullcontext)
    assert not sharing_is_exact(model, torch.device("cuda"), contextlib.nullcontext)
    served = formatter.with_system_prompt(SYSTEM)
    assert run(model, served, PROMPTS[:4]) == run(model, served, PROMPTS[:4], share=False)
    assert batches_shared == [3]  # the last batch holds one prompt: nothing to share


def test_without_a_long_shared_prefix_the_plain_path_runs(
    tiny, batches_shared, monkeypatch
) -> None:
    model, formatter = tiny
    served = formatter.with_system_prompt(None)
    # raw prompts: the chat template alone would share its header and default system prompt
    monkeypatch.setattr(served, "prompt_text", lambda prompt, *_: prompt)
    assert shared_prefix_length([served.encode_prompt(p) for p in PROMPTS]) < MIN_SHARED_PREFIX
    out = run(model, served, PROMPTS, share=True)
    assert not batches_shared
    assert out == [run(model, served, [p], batch_size=1, share=False)[0] for p in PROMPTS]


def test_a_row_that_ends_early_is_cut_at_its_stop_token(tiny, monkeypatch) -> None:
    model, formatter = tiny
    served = formatter.with_system_prompt(SYSTEM)
    ids = served.encode_prompt(PROMPTS[2])
    tokens = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                            pad_token_id=served.tokenizer.pad_token_id)[0, len(ids):].tolist()
    end = next(j for j in range(2, len(tokens)) if tokens[j] not in tokens[:j])
    monkeypatch.setattr(served, "stop_token_ids", lambda: [tokens[end]])
    shared = run(model, served, PROMPTS, batch_size=4, share=True)
    assert shared == run(model, served, PROMPTS, batch_size=4, share=False)
    expected = served.tokenizer.decode(tokens[: end + 1], skip_special_tokens=True).strip()
    assert shared[2] == expected
    assert max(len(c) for c in shared) > len(expected)  # the others ran on


def test_a_batch_stops_once_every_row_has_ended(tiny, monkeypatch) -> None:
    model, formatter = tiny
    served = formatter.with_system_prompt(SYSTEM)
    monkeypatch.setattr(served, "stop_token_ids", lambda: list(range(len(served.tokenizer))))
    steps: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: steps.append(1))
    try:
        run(model, served, PROMPTS[:3], share=True, new_tokens=12)
    finally:
        hook.remove()
    assert len(steps) == 1  # every row ended at its first token: no further decoding step


def test_shared_prefix_length_leaves_each_row_a_token() -> None:
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3]]) == 0
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_prefix_padded_puts_the_padding_between_prefix_and_suffix() -> None:
    ids, mask = prefix_padded([[1, 2, 3], [1, 2, 4, 5, 6]], 2, pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0, 3], [1, 2, 4, 5, 6]]
    assert mask.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]


def test_a_peft_wrapped_model_shares_its_prefix(tiny, batches_shared) -> None:
    from peft import LoraConfig, get_peft_model

    model, formatter = tiny
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"],
                                                               init_lora_weights=False))
    served = formatter.with_system_prompt(SYSTEM)
    shared = run(wrapped, served, PROMPTS[:6], share=True)
    assert batches_shared == [3, 3]
    assert shared == run(wrapped, served, PROMPTS[:6], share=False)


def test_forced_sharing_runs_under_bf16_autocast(tiny) -> None:
    # bf16 is not bit-exact (see hftlab.eval_prefix), so only that it runs is checked here
    model, formatter = tiny
    out = generate(model, formatter.with_system_prompt(SYSTEM), PROMPTS[:4], 6, 4, CPU,
                   lambda: torch.autocast("cpu", dtype=torch.bfloat16), share_prefix=True)
    assert len(out) == 4 and all(isinstance(c, str) for c in out)
