"""TAR's adversary: the fine-tuning attack it simulates inside each outer step (K AdamW steps
on harmful batches from the current weights) and the tamper-resistance gradient it takes from
the attacked weights (first order, entropy of the held-out harmful batch). The objective that
combines it with the retain term is :mod:`hftlab.defenses.tar`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from hftlab.defenses.common import global_norm
from hftlab.train import supervised_logits

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

ADVERSARY_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, as the reference's inner optimizer


class Batches(Protocol):
    def next(self) -> Batch: ...


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mean entropy of softmax(logits) over the leading positions (reference
    ``max_entropy_loss``): minimising it makes the predictions more uniform."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return -entropy.mean()


def tamper_weights(
    inner_steps: int, tr_every: int, tamper_weight: float, weighting: str,
    schedule_lambda: float, tasks: int = 1,
) -> dict[int, float]:
    """{inner step i (0-based, after i + 1 adversary updates): weight of ∇L_TR there}, as the
    reference's ``meta_grad_scale = grad_scale · schedule(i, K, λ) / num_tasks`` at the steps
    with (i + 1) % subsample == 0 (the last step when ``tr_every`` > K)."""
    every = min(tr_every, inner_steps)
    weights = {}
    for i in range(inner_steps):
        if (i + 1) % every:
            continue
        if weighting == "schedule":
            s = math.exp(schedule_lambda * (i - (inner_steps - 1)))
        else:
            s = 1.0 / inner_steps
        weights[i] = tamper_weight * s / tasks
    return weights


def tamper_resistance_gradient(
    trainer: SFTTrainer,
    params: list[torch.nn.Parameter],
    adversary: Batches,
    heldout: Batch,
    steps: int,
    lr: float,
    weights: dict[int, float],
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Simulate ``steps`` AdamW steps of a fine-tuning attack on ``adversary`` batches from the
    current weights and return Σ_i weights[i] · ∇ entropy_loss(w_i; heldout) per parameter
    (float32), first order. The weights are restored exactly and every ``.grad`` is None when
    this returns (call it within ``trainer.extra_passes``, which sets the step's aside)."""
    model = trainer.model
    backward = trainer.accelerator.backward
    saved = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    # multi-tensor AdamW (torch's default on GPUs; a per-parameter loop on CPUs otherwise)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=ADVERSARY_WEIGHT_DECAY,
                                  foreach=True)
    stats = {"adversary_lr": lr, "tamper_resistance_loss": 0.0}
    try:
        for p in params:
            p.grad = None
        for i in range(steps):
            loss = trainer.compute_loss(adversary.next())
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == 0:
                stats["adversary_loss_first"] = float(loss.detach())
            stats["adversary_loss_last"] = float(loss.detach())
            if i not in weights:
                continue
            with trainer.autocast():
                logits, targets, _ = supervised_logits(model, heldout)
            tr = entropy_loss(logits)
            backward(weights[i] * tr)
            with torch.no_grad():
                have = [i for i, p in enumerate(params) if p.grad is not None]
                if have:
                    torch._foreach_add_([total[i] for i in have],
                                        [params[i].grad.float() for i in have])
                for p in params:
                    p.grad = None
            stats["tamper_resistance_loss"] += weights[i] * float(tr.detach())
            stats["harmful_entropy_after_attack"] = -float(tr.detach())
            stats["harmful_loss_after_attack"] = float(
                F.cross_entropy(logits.detach(), targets)
            )
        with torch.no_grad():
            stats["attack_shift"] = float(
                global_norm([p.detach() - s for p, s in zip(params, saved)])
            )
    finally:
        optimizer.state.clear()
        del optimizer
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            for p in params:
                p.grad = None
    return total, stats
