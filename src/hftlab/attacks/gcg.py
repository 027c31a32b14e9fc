"""Greedy Coordinate Gradient search over a token sequence (Zou et al. 2023, arXiv 2307.15043),
as the Virus reference runs it (git-disl/Virus ``trainer.py``: ``get_illegal_tokens``,
``get_resample_ids`` and the candidate loop). The objective is the caller's: anything that gives
a one-hot gradient and scores candidate sequences (see :class:`GCGProblem`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch


class Scored(Protocol):
    total: float


ScoredT = TypeVar("ScoredT", bound=Scored)


class GCGProblem(Protocol[ScoredT]):
    """What :func:`gcg_step` needs of an objective over token sequences."""

    @property
    def illegal(self) -> torch.Tensor:
        """(vocabulary,) bool: ids never substituted in."""

    def proposal_gradient(self, tokens: torch.Tensor) -> torch.Tensor:
        """(len(tokens), vocabulary) gradient of the objective w.r.t. the one-hot encoding."""

    def evaluate(self, candidates: Sequence[torch.Tensor]) -> list[ScoredT]:
        """The objective of each candidate (lower is better)."""

    def retokenizes(self, tokens: torch.Tensor) -> bool:
        """Whether the sequence survives a decode → encode round trip."""


def illegal_tokens(tokenizer: Any, rows: int) -> torch.Tensor:
    """(rows,) bool: ids GCG may not substitute in. The reference's ``get_illegal_tokens``: ids
    that decode to text that is not printable ASCII, and bos/eos/pad/unk; here also every special
    or added token and embedding rows past the tokenizer's vocabulary."""
    mask = torch.ones(rows, dtype=torch.bool)
    size = min(int(tokenizer.vocab_size), rows)
    for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(size)])):
        mask[i] = not (text.isascii() and text.isprintable())
    for i in tokenizer.all_special_ids:
        if 0 <= i < rows:
            mask[i] = True
    return mask


def top_k_substitutions(grad: torch.Tensor, k: int, illegal: torch.Tensor) -> torch.Tensor:
    """(positions, k) token ids: at each position the ``k`` legal tokens of most negative
    one-hot gradient (the reference: ``(-grad).topk(k)`` with illegal entries at −1e10)."""
    scores = (-grad).masked_fill(illegal.to(grad.device), -math.inf)
    k = min(k, int((~illegal).sum()))
    return scores.topk(k, dim=1).indices.cpu()


def sample_swaps(positions: int, k: int, n: int,
                 generator: torch.Generator) -> list[tuple[int, int]]:
    """``n`` distinct (position, rank) pairs drawn uniformly (the reference's
    ``get_resample_ids``), in the order drawn; at most positions·k."""
    n = min(n, positions * k)
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < n:
        where = torch.randint(positions, (n,), generator=generator).tolist()
        rank = torch.randint(k, (n,), generator=generator).tolist()
        for pair in zip(where, rank):
            if len(seen) < n:
                seen.setdefault(pair, None)
    return list(seen)


@dataclass
class StepResult(Generic[ScoredT]):
    tokens: torch.Tensor
    scored: ScoredT
    evaluated: list[ScoredT]
    chosen: int  # index among the evaluated candidates; 0 is the current sequence


def gcg_step(problem: GCGProblem[ScoredT], tokens: torch.Tensor, top_k: int, candidates: int,
             generator: torch.Generator, retokenize: bool = False) -> StepResult[ScoredT]:
    """One GCG step: top-k substitutions per position from the one-hot gradient, ``candidates``
    single-token swaps drawn among them, each scored by the full objective; the best of them and
    of the current sequence (the reference's candidate 0) is kept, so the objective never rises.
    With ``retokenize`` only swaps that survive a decode → encode round trip are scored."""
    top = top_k_substitutions(problem.proposal_gradient(tokens), top_k, problem.illegal)
    pool = [tokens]
    for position, rank in sample_swaps(len(tokens), top.shape[1], candidates, generator):
        swapped = tokens.clone()
        swapped[position] = top[position, rank]
        if not retokenize or problem.retokenizes(swapped):
            pool.append(swapped)
    evaluated = problem.evaluate(pool)
    chosen = min(range(len(pool)), key=lambda i: (evaluated[i].total, i))  # ties: earliest
    return StepResult(pool[chosen], evaluated[chosen], evaluated, chosen)
