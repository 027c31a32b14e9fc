"""Extra forward/backward passes inside one training step, for defenses whose update needs
gradients other than the batch loss's (Booster's harmful-loss correction, Panacea's
perturbation, TAR's simulated attacks, EWC's penalty).

The trainer accumulates the micro-batches of one optimizer step in ``.grad``; a defense's extra
passes must neither see those gradients nor leave theirs behind. :class:`ExtraPasses` sets the
step's earlier gradients aside on entry, hands each extra pass its own gradient, and on exit
writes ``.grad = earlier + (what .grad holds then) + Σ scale · extra``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch


def take_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Detach the current ``.grad`` of each parameter (zeros where none) and clear them."""
    grads = []
    for p in params:
        grads.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        p.grad = None
    return grads


class ExtraPasses:
    """Use as ``with trainer.extra_passes(params) as passes:``. Inside, ``.grad`` starts empty:
    :meth:`grads` backpropagates a loss and returns its gradient alone, :meth:`add` queues a
    gradient to add at the end; a plain ``trainer.backward`` leaves its gradient in ``.grad``,
    which is kept. On a normal exit every parameter's ``.grad`` is the step's earlier gradient
    plus what ``.grad`` holds plus the queued gradients (each in the parameter's dtype)."""

    def __init__(self, params: list[torch.nn.Parameter],
                 backward: Callable[[torch.Tensor], None]) -> None:
        self.params = params
        self._backward = backward
        self._earlier: list[torch.Tensor] = []
        self._queued: list[tuple[list[torch.Tensor], float]] = []

    def __enter__(self) -> ExtraPasses:
        self._earlier = take_grads(self.params)
        self._queued = []
        return self

    def grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of ``loss`` (unscaled) per parameter, zeros where it has none;
        ``.grad`` is empty again when this returns."""
        self._backward(loss)
        return take_grads(self.params)

    def add(self, extra: list[torch.Tensor], scale: float = 1.0) -> None:
        """Add ``scale · extra`` (one tensor per parameter) to the gradients on exit."""
        if len(extra) != len(self.params):
            raise ValueError(f"{len(extra)} gradients for {len(self.params)} parameters")
        self._queued.append((extra, scale))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is not None:  # the step failed: nothing is written, the stage stops
            return
        with torch.no_grad():
            for index, (p, before) in enumerate(zip(self.params, self._earlier)):
                total = before if p.grad is None else before + p.grad
                for extra, scale in self._queued:
                    total = total + (scale * extra[index]).to(p.dtype)
                p.grad = total
