"""The alignment-stage defenses' fast paths (issue 34) against the straightforward computation
they replace, written out here one parameter and one chunk at a time: RepNoise's fused logit
lens (one weight cast per step, one-pass underflow cut-off, fused scale-and-cast), Booster's and
Panacea's multi-tensor perturb-and-restore, TAR's multi-tensor inner AdamW and accumulation.
Each must give the same update to ≤ 1e-6 relative (in practice bit for bit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import Cycle, make_trainer, token_batch

from hftlab.defenses import DEFENSES
from hftlab.defenses.booster import booster_gradients
from hftlab.defenses.common import global_norm
from hftlab.defenses.panacea import ascent_perturbation, panacea_gradients
from hftlab.defenses.repnoise_losses import UNDERFLOW_LOG_PROB, FusedLensCE, lens_weight
from hftlab.defenses.tar_adversary import (
    ADVERSARY_WEIGHT_DECAY,
    entropy_loss,
    tamper_resistance_gradient,
)
from hftlab.train import supervised_logits

REL = 1e-6


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.allclose(g, w, rtol=REL, atol=REL * float(w.abs().max()) + 1e-30)


# --- RepNoise: the logit lens ------------------------------------------------------------------


def naive_lens(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d rows) as the lens was computed before: autocast casting the weight at
    each product, clamp + exp + mask for the underflow, divide, then the product."""
    n = rows.shape[0]
    total = torch.zeros((), dtype=torch.float32)
    grad_rows = torch.empty_like(rows)
    for start in range(0, n, chunk):
        part, part_targets = rows[start:start + chunk], targets[start:start + chunk]
        log_probs = torch.log_softmax(F.linear(part, weight).float(), dim=-1)
        total -= log_probs.gather(1, part_targets[:, None]).sum()
        grad = log_probs.clamp(min=UNDERFLOW_LOG_PROB).exp_()
        grad.masked_fill_(log_probs < UNDERFLOW_LOG_PROB, 0.0)
        grad[torch.arange(len(part_targets)), part_targets] -= 1.0
        grad /= n
        grad_rows[start:start + chunk] = (grad @ weight.to(grad.dtype)).to(rows.dtype)
    return total / n, grad_rows


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: many probabilities below e^-80
def test_fused_lens_equals_the_unoptimised_lens(bf16, spread) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=gen)
    rows = torch.randn(37, 16, generator=gen) * spread
    targets = torch.randint(0, 300, (37,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want_loss, want_grad = naive_lens(rows, weight, targets, chunk=8)
        leaf = rows.clone().requires_grad_()
        loss = FusedLensCE.apply(leaf, lens_weight(weight), targets, 8)
    loss.backward()
    assert_same([loss.detach(), leaf.grad], [want_loss, want_grad])
    if spread > 1:  # the cut-off acted
        assert bool((torch.log_softmax(rows @ weight.T, -1) < UNDERFLOW_LOG_PROB).any())


def test_lens_weight_is_cast_once_only_when_frozen_under_autocast() -> None:
    weight = torch.randn(5, 3)
    assert lens_weight(weight) is weight  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lens_weight(weight).dtype == torch.bfloat16
        trainable = weight.clone().requires_grad_()
        assert lens_weight(trainable) is trainable  # its gradient is formed from it


def test_fused_lens_weight_gradient_equals_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    rows = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=gen)
    FusedLensCE.apply(rows, weight, targets, 4).backward()
    got = [rows.grad.clone(), weight.grad.clone()]
    rows.grad, weight.grad = None, None
    F.cross_entropy(rows @ weight.T, targets).backward()
    assert_same(got, [rows.grad, weight.grad])


# --- Booster and Panacea: perturb and restore --------------------------------------------------


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def naive_booster(trainer, passes, harmful, lamb, alpha):
    params = passes.params
    grad_h = passes.grads(trainer.compute_loss(harmful))
    norm = global_norm(grad_h) + 1e-7
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grad_h):
            p.sub_(alpha * g / norm.to(g.dtype))
    grad_shifted = passes.grads(trainer.compute_loss(harmful))
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return [lamb * (a - b) for a, b in zip(grad_h, grad_shifted)]


def test_booster_correction_equals_per_parameter_loop(tiny_lora) -> None:
    trainer = make_trainer(tiny_lora, DEFENSES.get("booster")())
    harmful = token_batch(10, seed=2)
    before = [p.detach().clone() for p in trainable(tiny_lora)]
    with trainer.extra_passes() as passes:
        got, _ = booster_gradients(trainer, passes, harmful, 5.0, 0.1)
    assert all(torch.equal(p, b) for p, b in zip(trainable(tiny_lora), before))
    with trainer.extra_passes() as passes:
        want = naive_booster(trainer, passes, harmful, 5.0, 0.1)
    tiny_lora.zero_grad(set_to_none=True)
    assert_same(got, want)


def naive_panacea(trainer, passes, batch, harmful, lamb, rho, cap):
    params = passes.params
    grad_f = passes.grads(trainer.compute_loss(batch))
    grad_h = passes.grads(trainer.compute_loss(harmful))
    eps = ascent_perturbation(grad_h, rho)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    grad_h_eps = passes.grads(torch.clamp(trainer.compute_loss(harmful), max=cap))
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return [f - lamb * (he - h) for f, h, he in zip(grad_f, grad_h, grad_h_eps)], eps


def test_panacea_gradient_equals_per_parameter_loop(tiny_lora) -> None:
    trainer = make_trainer(tiny_lora, DEFENSES.get("panacea")(), stage="finetune")
    batch, harmful = token_batch(4, seed=1), token_batch(10, seed=2)
    before = [p.detach().clone() for p in trainable(tiny_lora)]
    with trainer.extra_passes() as passes:
        got, got_eps, _ = panacea_gradients(trainer, passes, batch, harmful, 0.5, 0.5, 100.0)
    assert all(torch.equal(p, b) for p, b in zip(trainable(tiny_lora), before))
    with trainer.extra_passes() as passes:
        want, want_eps = naive_panacea(trainer, passes, batch, harmful, 0.5, 0.5, 100.0)
    tiny_lora.zero_grad(set_to_none=True)
    assert_same(got, want)
    assert_same(got_eps, want_eps)


# --- TAR: the simulated attack -----------------------------------------------------------------


def naive_tamper(trainer, params, adversary, heldout, steps, lr, weights):
    """The attack with torch's per-parameter AdamW and a per-parameter accumulation."""
    saved = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=ADVERSARY_WEIGHT_DECAY,
                                  foreach=False)
    for i in range(steps):
        trainer.accelerator.backward(trainer.compute_loss(adversary.next()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i not in weights:
            continue
        with trainer.autocast():
            logits, _, _ = supervised_logits(trainer.model, heldout)
        trainer.accelerator.backward(weights[i] * entropy_loss(logits))
        with torch.no_grad():
            for acc, p in zip(total, params):
                if p.grad is not None:
                    acc.add_(p.grad.float())
                p.grad = None
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return total


def test_tar_attack_equals_per_parameter_adamw(tiny_lora) -> None:
    trainer = make_trainer(tiny_lora, DEFENSES.get("tar")(inner_steps=3, tr_every=1))
    params = trainable(tiny_lora)
    adversary = [token_batch(4, seed=s) for s in (3, 4, 5)]
    heldout = token_batch(4, seed=6)
    weights = {0: 0.5, 1: 1.0, 2: 2.0}
    before = [p.detach().clone() for p in params]
    got, _ = tamper_resistance_gradient(trainer, params, Cycle(*adversary), heldout, 3, 1e-2,
                                        weights)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    want = naive_tamper(trainer, params, Cycle(*adversary), heldout, 3, 1e-2, weights)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert_same(got, want)
    assert max(float(g.abs().max()) for g in got) > 0
