"""Prompt formatting and tokenisation: the model's chat template, or the Alpaca template that
the git-disl reference repos use with base (non-chat) models.

System prompts: a row may carry its own in ``Example.meta["system_prompt"]`` (e.g. BackdoorAlign's
trigger-prefixed safety rows); other rows get the formatter's default. In the chat format a system
prompt is the system turn; in the Alpaca format it is the preamble line ("Below is an instruction
that describes a task. ...") that the template opens with, so a custom one replaces that line.
``model.system_prompt`` is only read by the chat format (the Alpaca template keeps its preamble).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from hftlab.config import ModelConfig
from hftlab.data.records import Example

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_BODY = "### Instruction:\n{prompt}\n\n### Response:\n"
ALPACA_TEMPLATE = ALPACA_PREAMBLE + "\n\n" + ALPACA_BODY
SYSTEM_PROMPT_KEY = "system_prompt"  # Example.meta key of a row's own system prompt
# End-of-turn markers of common chat templates; generation stops at any that exist.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class _Default(enum.Enum):
    SYSTEM = "default"


#: "No system prompt given": use the formatter's default (``None`` means no system prompt at all).
DEFAULT_SYSTEM = _Default.SYSTEM


@dataclass
class Tokenized:
    """Token ids of one example; the first ``n_prompt`` are context, the rest are supervised."""

    input_ids: list[int]
    n_prompt: int

    @property
    def n_supervised(self) -> int:
        return len(self.input_ids) - self.n_prompt


class PromptFormatter:
    """Turns :class:`Example` rows into token ids for training and prompts for generation."""

    def __init__(self, tokenizer: Any, cfg: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.format = cfg.prompt_format
        self.system_prompt = cfg.system_prompt
        if self.format == "chat" and not getattr(tokenizer, "chat_template", None):
            from hftlab.config import ConfigError

            raise ConfigError(
                "model.prompt_format is 'chat' but this tokenizer has no chat template; "
                "set model.prompt_format=alpaca for base models"
            )
        # what rows without their own system prompt get (with_system_prompt sets it)
        self._served: str | None | _Default = DEFAULT_SYSTEM

    @cached_property
    def default_system_prompt(self) -> str | None:
        """The system prompt in effect for rows without their own: the Alpaca preamble; in the chat
        format ``model.system_prompt``, else the one the chat template inserts by itself (e.g.
        "You are a helpful assistant."), else None. Read this to extend the prompt the model is
        normally served with (e.g. prepend a trigger) rather than replace it."""
        if self._served is not DEFAULT_SYSTEM:
            return self._served
        if self.format == "alpaca":
            return ALPACA_PREAMBLE
        if self.system_prompt is not None:
            return self.system_prompt
        return implicit_system_prompt(self.tokenizer)

    def with_system_prompt(self, system_prompt: str | None) -> PromptFormatter:
        """A copy that serves ``system_prompt`` to every row without its own (the deployed model's
        prompt, e.g. with a secret trigger); this formatter is left as it is."""
        served = copy.copy(self)
        served.__dict__.pop("default_system_prompt", None)  # the cached value is this one's
        served._served = system_prompt
        return served

    def _system(self, system_prompt: str | None | _Default) -> str | None | _Default:
        return self._served if system_prompt is DEFAULT_SYSTEM else system_prompt

    def _messages(
        self, prompt: str, system_prompt: str | None | _Default = DEFAULT_SYSTEM
    ) -> list[dict[str, str]]:
        system = self._system(system_prompt)
        if system is DEFAULT_SYSTEM:
            system = self.system_prompt
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        return messages

    def prompt_text(
        self, prompt: str, system_prompt: str | None | _Default = DEFAULT_SYSTEM
    ) -> str:
        if self.format == "alpaca":
            bos = self.tokenizer.bos_token or ""
            system = self._system(system_prompt)
            if system is DEFAULT_SYSTEM:
                return bos + ALPACA_TEMPLATE.format(prompt=prompt)
            header = f"{system}\n\n" if system else ""
            return bos + header + ALPACA_BODY.format(prompt=prompt)
        return self.tokenizer.apply_chat_template(
            self._messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
        )

    def completion_text(
        self, prompt: str, response: str, system_prompt: str | None | _Default = DEFAULT_SYSTEM
    ) -> str:
        """What follows the prompt in a full conversation: the response and its end marker."""
        if self.format == "alpaca":
            return response + (self.tokenizer.eos_token or "")
        prompt_text = self.prompt_text(prompt, system_prompt)
        full = self.tokenizer.apply_chat_template(
            [*self._messages(prompt, system_prompt), {"role": "assistant", "content": response}],
            tokenize=False,
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        return response + (self.tokenizer.eos_token or "")

    def encode_prompt(
        self, prompt: str, system_prompt: str | None | _Default = DEFAULT_SYSTEM
    ) -> list[int]:
        text = self.prompt_text(prompt, system_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, example: Example, max_length: int) -> Tokenized:
        """Prompt + response ids, cut to ``max_length`` from the right (as the references do);
        the row's own system prompt (``meta["system_prompt"]``) if it has one."""
        system = example.meta.get(SYSTEM_PROMPT_KEY, DEFAULT_SYSTEM)
        prompt_ids = self.encode_prompt(example.prompt, system)
        completion_ids = self.tokenizer(
            self.completion_text(example.prompt, example.response, system),
            add_special_tokens=False,
        )["input_ids"]
        ids = (prompt_ids + completion_ids)[:max_length]
        return Tokenized(ids, min(len(prompt_ids), len(ids)))

    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        return sorted(i for i in ids if i is not None)


def implicit_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt a chat template inserts when a conversation has none (Qwen's "You are a
    helpful assistant.", ...), or None when it inserts none, an empty one, or rejects system turns.
    Found by rendering with a marker system turn and without any, and checked: rendering with the
    recovered text as the system turn must reproduce the render without one exactly."""
    user = [{"role": "user", "content": "probe"}]
    marker = "\x01system-marker\x01"

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    try:
        without = render(user)
        marked = render([{"role": "system", "content": marker}, *user])
    except Exception:  # templates raise their own error types (e.g. no system role)
        return None
    at = marked.find(marker)
    if at < 0:
        return None
    prefix, suffix = marked[:at], marked[at + len(marker) :]
    if len(without) < len(prefix) + len(suffix):
        return None
    if not (without.startswith(prefix) and without.endswith(suffix)):
        return None
    candidate = without[len(prefix) : len(without) - len(suffix)]
    if not candidate.strip():
        return None
    same = render([{"role": "system", "content": candidate}, *user]) == without
    return candidate if same else None
