"""The guard term of the Virus attack (:mod:`hftlab.attacks.virus`, whose docstring documents the
attack): the guard's "safe" loss, differentiable through the virus' tokens
(:class:`TokenGuard`, ``judge_term: gradient``) or read on the decoded text
(:func:`judge_safe_losses`, ``judge_term: ranking``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hftlab.attacks.virus_surrogate import SENTINEL
from hftlab.config import ConfigError
from hftlab.judges import Judge
from hftlab.judges.llama_guard import LlamaGuardJudge


def check_shared_vocabulary(ours: Any, guard: Any, source: str) -> None:
    """The virus' one-hot is over the surrogate's vocabulary and multiplies the guard's
    embedding matrix, so every id of the surrogate's tokenizer must be the same token in the
    guard's (the reference's Llama Guard 2 shares Llama-3's tokenizer)."""
    ids = list(range(len(ours)))
    if len(guard) < len(ours) or (guard.convert_ids_to_tokens(ids)
                                  != ours.convert_ids_to_tokens(ids)):
        raise ConfigError(
            f"attack 'virus' (judge_term: gradient): the guard {source} does not share the "
            "surrogate's vocabulary, so its loss cannot be back-propagated into the virus "
            "tokens; give judge_args.model a guard with the victim's tokenizer, or use "
            "judge_term: ranking")


class TokenGuard:
    """The reference's guardrail loss as a differentiable function of the virus' tokens
    (trainer.py ``loss4``; moderation.py ``LlamaGuardModeration.format_inputs_embed_labels``):
    a causal-LM guard reads the Llama Guard prompt of (prompt, answer ⊕ virus), rendered by the
    ``llama_guard`` judge (:meth:`LlamaGuardJudge.render`), with the virus entering as
    ``onehot @ E_guard`` at the end of the answer; the loss is the cross-entropy of the token
    "safe" as the guard's first answer token."""

    def __init__(self, judge: LlamaGuardJudge, tokenizer: Any) -> None:
        from hftlab.model import causal_lm_parts

        tok, model = judge.loaded()
        self.judge, self.tok, self.model = judge, tok, model.eval()
        check_shared_vocabulary(tokenizer, self.tok, judge.source)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.body, self.head = causal_lm_parts(self.model)
        self.embed = self.model.get_input_embeddings().weight
        self.shared = len(tokenizer)  # ≤ the guard's rows: checked above via the tokenizers
        if self.embed.shape[0] < self.shared:
            raise ConfigError(f"attack 'virus': the guard {judge.source} has fewer embedding "
                              f"rows ({self.embed.shape[0]}) than the vocabulary ({self.shared})")
        self.safe = self.tok("safe", add_special_tokens=False)["input_ids"][0]

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def context(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Guard token ids before and after a virus appended to ``answer``."""
        text = self.judge.render(prompt, answer + SENTINEL)
        cut = text.find(SENTINEL)
        if cut < 0:
            raise ConfigError("attack 'virus': the guard's prompt drops the end of the answer")
        left, right = text[:cut], text[cut + len(SENTINEL):]
        return (self.tok(left, add_special_tokens=False)["input_ids"],
                self.tok(right, add_special_tokens=False)["input_ids"])

    def _safe_loss(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.body(inputs_embeds=embeds)
        last = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, -1]
        return -F.log_softmax(self.head(last).float(), -1)[:, self.safe]

    def loss(self, context: tuple[list[int], list[int]], onehot: torch.Tensor) -> torch.Tensor:
        """The guard's "safe" loss with the virus given as a (len, vocabulary) one-hot."""
        table = self.model.get_input_embeddings()
        left, right = (torch.tensor(c, dtype=torch.long, device=self.device) for c in context)
        # ids past the tokenizer are illegal substitutions: their (zero) columns are dropped
        n = min(onehot.shape[1], self.shared)
        middle = onehot.to(self.device, self.embed.dtype)[:, :n] @ self.embed[:n]
        return self._safe_loss(torch.cat([table(left), middle, table(right)])[None])[0]

    @torch.no_grad()
    def losses(self, context: tuple[list[int], list[int]],
               candidates: Sequence[torch.Tensor]) -> list[float]:
        """:meth:`loss` of each candidate virus (equal lengths: batched, no padding)."""
        table = self.model.get_input_embeddings()
        out: list[float] = []
        size = self.judge.options.batch_size
        for start in range(0, len(candidates), size):
            ids = torch.stack([torch.tensor([*context[0], *c.tolist(), *context[1]])
                               for c in candidates[start : start + size]]).to(self.device)
            out.extend(self._safe_loss(table(ids)).tolist())
        return out


def judge_safe_losses(judge: Judge, prompts: list[str],
                      completions: list[str]) -> list[float] | None:
    """``judge_term: ranking``: per row, the judge's cross-entropy of the verdict "safe" on the
    decoded text: ``llama_guard``: −log p of the first token of "safe" as the answer's first
    token; ``embedding``: −log(1 − p(harmful)); ``beaverdam``: −log(1 − max category
    probability). None for a judge with no loss (e.g. the keyword judge), whose λ term is then
    0."""
    from hftlab.judges.beaverdam import BeaverDamJudge
    from hftlab.judges.embedding import EmbeddingJudge

    if isinstance(judge, EmbeddingJudge):
        features = judge.encoder().pair_features(prompts, completions)
        return F.softplus(judge.head.logits(features)).tolist()
    if isinstance(judge, BeaverDamJudge):
        worst = [max(r["probabilities"].values()) for r in judge.predict(prompts, completions)]
        return [-math.log(max(1.0 - p, 1e-12)) for p in worst]
    if isinstance(judge, LlamaGuardJudge):
        return _llama_guard_safe_losses(judge, prompts, completions)
    return None


@torch.no_grad()
def _llama_guard_safe_losses(judge: LlamaGuardJudge, prompts: list[str],
                             completions: list[str]) -> list[float]:
    tok, model = judge.loaded()
    safe = tok("safe", add_special_tokens=False)["input_ids"][0]
    device = next(model.parameters()).device
    texts = [judge.render(p, c) for p, c in zip(prompts, completions)]
    losses: list[float] = []
    for start in range(0, len(texts), judge.options.batch_size):
        batch = tok(texts[start : start + judge.options.batch_size], padding=True,
                    add_special_tokens=False, return_tensors="pt").to(device)
        logits = model(**batch).logits[:, -1].float()  # left-padded: the last position
        losses.extend((-F.log_softmax(logits, -1)[:, safe]).tolist())
    return losses
