"""The trainer's one helper for extra gradient passes (Booster, Panacea, TAR, EWC use it)."""

from __future__ import annotations

import pytest
import torch

from hftlab.train_grads import ExtraPasses, take_grads


def backward(loss: torch.Tensor) -> None:
    loss.backward()


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor(3.0))]


def test_earlier_gradients_are_set_aside_and_summed_back_with_the_passes() -> None:
    a, b = ps = params()
    (a.sum() + b).backward()  # an earlier micro-batch: grads [1, 1] and 1
    with ExtraPasses(ps, backward) as passes:
        assert a.grad is None and b.grad is None  # the extra passes start clean
        extra = passes.grads((a * a).sum() + 2 * b)  # its own gradient alone: [2, 4] and 2
        assert torch.equal(extra[0], torch.tensor([2.0, 4.0])) and float(extra[1]) == 2.0
        assert a.grad is None and b.grad is None
        (3 * a.sum()).backward()  # the batch's own loss, left in .grad (b has none)
        passes.add(extra, 0.5)
    assert torch.equal(a.grad, torch.tensor([1 + 3 + 1.0, 1 + 3 + 2.0]))
    assert float(b.grad) == 1 + 0.5 * 2


def test_the_sum_keeps_each_parameters_dtype_and_a_failed_step_writes_nothing() -> None:
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    with ExtraPasses([p], backward) as passes:
        passes.add([torch.full((2,), 0.25, dtype=torch.float32)], 2.0)
    assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad.float(), torch.full((2,), 0.5))
    with pytest.raises(RuntimeError), ExtraPasses([p], backward):
        raise RuntimeError("diverged")
    assert p.grad is None
    with pytest.raises(ValueError), ExtraPasses([p], backward) as passes:
        passes.add([], 1.0)


def test_take_grads_gives_zeros_where_there_is_none_and_clears() -> None:
    a, b = ps = params()
    a.sum().backward()
    grads = take_grads(ps)
    assert torch.equal(grads[0], torch.ones(2)) and torch.equal(grads[1], torch.zeros(()))
    assert a.grad is None and b.grad is None
