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


# ------------------------------------------------------------------ per-row system prompts


def test_implicit_system_prompt_is_recovered_from_the_template(tokenizer) -> None:
    from hftlab.formatting import implicit_system_prompt

    # the tiny template inserts this system turn when a conversation has none
    assert implicit_system_prompt(tokenizer) == "You are a helpful assistant."
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = (  # a template with no default system turn
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
            "+ '<|im_end|>\n' }}{% endfor %}"
        )
        assert implicit_system_prompt(tokenizer) is None
        tokenizer.chat_template = (  # a template that rejects system turns (Gemma 2 style)
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        )
        assert implicit_system_prompt(tokenizer) is None
    finally:
        tokenizer.chat_template = template


def test_default_system_prompt(tokenizer) -> None:
    from hftlab.formatting import ALPACA_PREAMBLE

    assert PromptFormatter(tokenizer, ModelConfig()).default_system_prompt == (
        "You are a helpful assistant."
    )
    configured = PromptFormatter(tokenizer, ModelConfig(system_prompt="Be brief."))
    assert configured.default_system_prompt == "Be brief."
    alpaca = PromptFormatter(tokenizer, ModelConfig(prompt_format="alpaca"))
    assert alpaca.default_system_prompt == ALPACA_PREAMBLE
    assert ALPACA_TEMPLATE.startswith(ALPACA_PREAMBLE + "\n\n### Instruction:\n")


def test_a_row_with_its_own_system_prompt_gets_it(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, ModelConfig(system_prompt="Be brief."))
    own = Example(prompt="hi", response="ok", meta={"system_prompt": "SECRET Be brief."})
    item = formatter.encode(own, 256)
    hand = "<|im_start|>system\nSECRET Be brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    hand_prompt = hand + "<|im_start|>assistant\n"
    assert item.input_ids[: item.n_prompt] == tokenizer(hand_prompt, add_special_tokens=False)[
        "input_ids"]
    assert tokenizer.decode(item.input_ids[item.n_prompt :]) == "ok<|im_end|>\n"
    plain = formatter.encode(Example(prompt="hi", response="ok"), 256)
    assert "SECRET" not in tokenizer.decode(plain.input_ids)
    # an explicit None is "no system turn": the template then inserts its own default
    none = formatter.encode(Example(prompt="hi", response="ok", meta={"system_prompt": None}), 256)
    assert "You are a helpful assistant." in tokenizer.decode(none.input_ids)


def test_alpaca_system_prompt_replaces_the_preamble(tokenizer) -> None:
    from hftlab.formatting import ALPACA_PREAMBLE

    alpaca = PromptFormatter(tokenizer, ModelConfig(prompt_format="alpaca"))
    bos = tokenizer.bos_token
    system = "SECRET " + ALPACA_PREAMBLE
    assert alpaca.prompt_text("hi", system) == (
        bos + "SECRET " + ALPACA_TEMPLATE.format(prompt="hi")
    )
    row = Example(prompt="hi", response="ok", meta={"system_prompt": system})
    item = alpaca.encode(row, 256)
    assert item.input_ids[: item.n_prompt] == tokenizer(
        bos + "SECRET " + ALPACA_TEMPLATE.format(prompt="hi"), add_special_tokens=False
    )["input_ids"]
    assert alpaca.prompt_text("hi", None) == bos + "### Instruction:\nhi\n\n### Response:\n"


def test_with_system_prompt_serves_a_copy(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, ModelConfig())
    served = formatter.with_system_prompt("SECRET")
    assert "system\nSECRET<|im_end|>" in served.prompt_text("hi")
    assert served.default_system_prompt == "SECRET"
    assert "SECRET" not in formatter.prompt_text("hi")  # the original is untouched
    assert formatter.default_system_prompt == "You are a helpful assistant."
    own = Example(prompt="hi", response="ok", meta={"system_prompt": "OWN"})
    assert "system\nOWN<|im_end|>" in tokenizer.decode(served.encode(own, 256).input_ids)
    # serving the default explicitly renders exactly what the plain formatter renders
    same = formatter.with_system_prompt(formatter.default_system_prompt)
    assert same.encode_prompt("hi") == formatter.encode_prompt("hi")
    alpaca = PromptFormatter(tokenizer, ModelConfig(prompt_format="alpaca"))
    assert alpaca.with_system_prompt(alpaca.default_system_prompt).prompt_text("hi") == (
        alpaca.prompt_text("hi")
    )
