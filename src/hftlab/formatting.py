"""Prompt formatting and tokenisation: the model's chat template, or the Alpaca template that
the git-disl reference repos use with base (non-chat) models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hftlab.config import ModelConfig
from hftlab.data.records import Example

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
# End-of-turn markers of common chat templates; generation stops at any that exist.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


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

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return messages

    def prompt_text(self, prompt: str) -> str:
        if self.format == "alpaca":
            bos = self.tokenizer.bos_token or ""
            return bos + ALPACA_TEMPLATE.format(prompt=prompt)
        return self.tokenizer.apply_chat_template(
            self._messages(prompt), tokenize=False, add_generation_prompt=True
        )

    def completion_text(self, prompt: str, response: str) -> str:
        """What follows the prompt in a full conversation: the response and its end marker."""
        if self.format == "alpaca":
            return response + (self.tokenizer.eos_token or "")
        prompt_text = self.prompt_text(prompt)
        full = self.tokenizer.apply_chat_template(
            [*self._messages(prompt), {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        return response + (self.tokenizer.eos_token or "")

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def encode(self, example: Example, max_length: int) -> Tokenized:
        """Prompt + response ids, cut to ``max_length`` from the right (as the references do)."""
        prompt_ids = self.encode_prompt(example.prompt)
        completion_ids = self.tokenizer(
            self.completion_text(example.prompt, example.response), add_special_tokens=False
        )["input_ids"]
        ids = (prompt_ids + completion_ids)[:max_length]
        return Tokenized(ids, min(len(prompt_ids), len(ids)))

    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        return sorted(i for i in ids if i is not None)
