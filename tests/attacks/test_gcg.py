"""GCG search on an objective small enough to solve by hand: a per-position cost table, whose
one-hot gradient is the table itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hftlab.attacks.gcg import gcg_step, sample_swaps, top_k_substitutions


@dataclass
class Score:
    total: float


class TableProblem:
    """Objective Σ_p cost[p, tokens[p]]: linear in the one-hot encoding."""

    def __init__(self, cost: torch.Tensor, illegal: torch.Tensor,
                 unreadable: set[int] | None = None) -> None:
        self.cost = cost
        self._illegal = illegal
        self.unreadable = unreadable or set()

    @property
    def illegal(self) -> torch.Tensor:
        return self._illegal

    def proposal_gradient(self, tokens: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(tokens, self.cost.shape[1]).float()
        onehot.requires_grad_(True)
        (grad,) = torch.autograd.grad((onehot * self.cost).sum(), onehot)
        return grad

    def evaluate(self, candidates: Sequence[torch.Tensor]) -> list[Score]:
        rows = torch.arange(self.cost.shape[0])
        return [Score(float(self.cost[rows, c].sum())) for c in candidates]

    def retokenizes(self, tokens: torch.Tensor) -> bool:
        return not set(tokens.tolist()) & self.unreadable


def test_top_k_skips_illegal_tokens() -> None:
    grad = torch.tensor([[0.0, -3.0, -1.0, -2.0], [5.0, 4.0, -1.0, 0.0]])
    illegal = torch.tensor([False, True, False, False])
    assert top_k_substitutions(grad, 2, illegal).tolist() == [[3, 2], [2, 3]]
    assert top_k_substitutions(grad, 9, illegal).shape == (2, 3)  # capped at the legal ids


def test_sample_swaps_are_distinct_capped_and_seeded() -> None:
    first = sample_swaps(3, 4, 10, torch.Generator().manual_seed(1))
    assert len(first) == len(set(first)) == 10
    assert all(0 <= p < 3 and 0 <= r < 4 for p, r in first)
    assert first == sample_swaps(3, 4, 10, torch.Generator().manual_seed(1))
    assert sorted(sample_swaps(2, 2, 50, torch.Generator().manual_seed(0))) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]


def test_step_takes_the_best_single_swap_by_hand() -> None:
    cost = torch.tensor([[0.0, 1.0, -5.0, 2.0],
                         [0.0, -2.0, 3.0, -9.0],
                         [0.0, -1.0, 0.5, 0.5]])
    illegal = torch.tensor([False, False, False, True])  # bars the −9 at position 1
    problem = TableProblem(cost, illegal)
    start = torch.tensor([0, 0, 0])
    # top-1 per position: 2 (−5), 1 (−2), 1 (−1); all 3 swaps drawn (3 positions × 1 rank)
    step = gcg_step(problem, start, top_k=1, candidates=10, generator=torch.Generator())
    assert step.evaluated[0].total == 0.0
    assert sorted(s.total for s in step.evaluated[1:]) == [-5.0, -2.0, -1.0]
    assert step.tokens.tolist() == [2, 0, 0] and step.scored.total == -5.0
    again = gcg_step(problem, step.tokens, top_k=1, candidates=10, generator=torch.Generator())
    assert again.tokens.tolist() == [2, 1, 0] and again.scored.total == -7.0
    assert start.tolist() == [0, 0, 0]  # the caller's tensor is not modified


def test_step_keeps_the_current_sequence_when_nothing_improves() -> None:
    cost = torch.tensor([[-1.0, 0.0, 2.0], [-1.0, 3.0, 0.0]])
    problem = TableProblem(cost, torch.zeros(3, dtype=torch.bool))
    step = gcg_step(problem, torch.tensor([0, 0]), top_k=2, candidates=4,
                    generator=torch.Generator().manual_seed(0))
    assert step.chosen == 0 and step.tokens.tolist() == [0, 0]


def test_retokenize_drops_swaps_that_do_not_read_back() -> None:
    cost = torch.tensor([[0.0, -4.0, -1.0]])
    problem = TableProblem(cost, torch.zeros(3, dtype=torch.bool), unreadable={1})
    step = gcg_step(problem, torch.tensor([0]), top_k=2, candidates=2,
                    generator=torch.Generator(), retokenize=True)
    assert len(step.evaluated) == 2  # the current sequence and the readable swap only
    assert step.tokens.tolist() == [2]
