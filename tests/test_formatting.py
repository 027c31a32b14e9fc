from __future__ import annotations

import pytest

from hftlab.config import ConfigError, ModelConfig
from hftlab.data.records import Example
from hftlab.formatting import ALPACA_TEMPLATE, PromptFormatter


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_example_supervises_the_answer_and_its_end_of_turn(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, ModelConfig())
    item = formatter.encode(Example(prompt="great movie", response="positive"), 256)
    prompt = tokenizer.decode(item.input_ids[: item.n_prompt])
    answer = tokenizer.decode(item.input_ids[item.n_prompt :])
    assert prompt.endswith("<|im_start|>assistant\n") and "great movie" in prompt
    assert answer == "positive<|im_end|>\n"
    assert item.input_ids[: item.n_prompt] == formatter.encode_prompt("great movie")


def test_system_prompt_and_alpaca_format(tokenizer) -> None:
    chat = PromptFormatter(tokenizer, ModelConfig(system_prompt="Be brief."))
    assert "system\nBe brief.<|im_end|>" in chat.prompt_text("hi")
    alpaca = PromptFormatter(tokenizer, ModelConfig(prompt_format="alpaca"))
    assert alpaca.prompt_text("hi").endswith(ALPACA_TEMPLATE.format(prompt="hi"))
    assert alpaca.completion_text("hi", "ok") == "ok<|im_end|>"


def test_truncation_keeps_the_prompt_first(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, ModelConfig())
    item = formatter.encode(Example(prompt="a " * 50, response="b " * 50), 40)
    assert len(item.input_ids) == 40 and item.n_supervised == 0


def test_chat_format_without_a_template_is_an_error(tokenizer) -> None:
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="prompt_format=alpaca"):
            PromptFormatter(tokenizer, ModelConfig())
    finally:
        tokenizer.chat_template = template


def test_stop_tokens_include_end_of_turn(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, ModelConfig())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in formatter.stop_token_ids()
