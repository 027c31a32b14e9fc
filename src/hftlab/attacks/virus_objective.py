"""The objective of the Virus attack (:mod:`hftlab.attacks.virus`, whose docstring documents the
attack) for one poisoned row: (1−λ)·similarity + λ·guard, as GCG scores candidates and takes its
one-hot proposal gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hftlab.attacks.virus_guard import TokenGuard
from hftlab.attacks.virus_surrogate import Surrogate, cosine, similarity_term
from hftlab.data.records import Example


@dataclass
class Terms:
    """One candidate's objective: (1−λ)·similarity + λ·judge (judge 0 when it has no loss)."""

    similarity: float
    cosine: float
    judge: float | None
    total: float


class VirusProblem:
    """One poisoned row: the benign row with a virus appended to its answer, and the gradient to
    match, that of the benign row with the unoptimised virus (the harmful row), as the reference
    stores on its first step (trainer.py: ``self.harmful_grad``). With a ``guard`` the judge
    term is the guard's token-level loss, also in the proposal gradient (``judge_term:
    gradient``); without, ``judge_loss`` scores the decoded text (``ranking``)."""

    def __init__(self, surrogate: Surrogate, benign: Example, virus: Sequence[int], lam: float,
                 judge_loss: Callable[[list[str], list[str]], list[float] | None],
                 guard: TokenGuard | None = None) -> None:
        from hftlab.formatting import DEFAULT_SYSTEM, SYSTEM_PROMPT_KEY

        self.surrogate = surrogate
        self.benign = benign
        self.lam = lam
        self.judge_loss = judge_loss
        system = benign.meta.get(SYSTEM_PROMPT_KEY, DEFAULT_SYSTEM)
        # the benign answer closed by its end-of-turn marker, then the harmful row (as the
        # reference concatenates two whole tokenised rows)
        self.prefix = surrogate.formatter.completion_text(benign.prompt, benign.response, system)
        self.layout = surrogate.layout(benign, self.prefix)
        self.guard = guard
        # the guard reads the row as uploaded: (prompt, benign answer ⊕ virus)
        self.guard_context = guard.context(benign.prompt, self.prefix) if guard else None
        self.initial = torch.tensor(list(virus), dtype=torch.long)
        self.target = [g.detach() for g in surrogate.gradient(self.layout, self.initial)]

    @property
    def illegal(self) -> torch.Tensor:
        return self.surrogate.illegal

    def response(self, virus: torch.Tensor) -> str:
        return self.prefix + self.surrogate.decode(virus.tolist())

    def row(self, virus: torch.Tensor) -> Example:
        return self.benign.replace(response=self.response(virus), is_harmful=True)

    def retokenizes(self, virus: torch.Tensor) -> bool:
        """Whether the provider, reading the row as text, gets back exactly these tokens."""
        encoded = self.surrogate.formatter.encode(self.row(virus), 10**9).input_ids
        return encoded == self.layout.ids(virus.tolist())

    def evaluate(self, candidates: Sequence[torch.Tensor]) -> list[Terms]:
        """The full objective of each candidate virus: one gradient per candidate, and the
        judge's loss of all candidates in one batch."""
        sims, coss = [], []
        for virus in candidates:
            grads = self.surrogate.gradient(self.layout, virus)
            sims.append(float(similarity_term(grads, self.target)))
            coss.append(cosine(grads, self.target))
        if self.guard is not None:
            judged = self.guard.losses(self.guard_context, candidates)
        else:
            judged = self.judge_loss([self.benign.prompt] * len(candidates),
                                     [self.response(v) for v in candidates])
        out = []
        for i, (sim, cos) in enumerate(zip(sims, coss)):
            judge = None if judged is None else float(judged[i])
            total = (1.0 - self.lam) * sim + self.lam * (judge or 0.0)
            out.append(Terms(sim, cos, judge, total))
        return out

    def proposal_gradient(self, virus: torch.Tensor) -> torch.Tensor:
        """(len(virus), vocabulary) gradient w.r.t. the virus' one-hot encoding (the
        reference's ``adv_onehot.grad``): of (1−λ)·similarity + λ·guard with a guard, of the
        similarity term alone without (the text judge has no gradient)."""
        rows = self.surrogate.embed.shape[0]
        onehot = F.one_hot(virus.to(self.surrogate.device), rows).float().requires_grad_(True)
        weights = (1.0, 0.0) if self.guard is None else (1.0 - self.lam, self.lam)
        objective = torch.zeros((), device=self.surrogate.device)
        if weights[0]:  # the reference skips each term whose weight is 0 (``lamb`` 0 or 1)
            grads = self.surrogate.gradient(self.layout, virus, onehot, create_graph=True)
            objective = objective + weights[0] * similarity_term(grads, self.target)
        if weights[1]:
            guard_loss = self.guard.loss(self.guard_context, onehot)
            objective = objective + weights[1] * guard_loss.to(objective.device)
        (grad,) = torch.autograd.grad(objective, onehot)
        return grad.detach()
