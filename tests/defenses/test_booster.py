"""Booster's applied gradient equals ∇f(w) + λ(∇h(w) − ∇h(w − α·g_h/‖g_h‖)), each term
computed separately with autograd; the weights are left exactly as they were."""

from __future__ import annotations

import pytest
import torch
from defense_helpers import (
    Cycle,
    autograd_of,
    make_trainer,
    step_keeping_earlier_grads,
    token_batch,
)

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import supervised_loss


def hand_booster(model, batch, harmful, lamb, alpha):
    grad_f = autograd_of(model, supervised_loss(model, batch))
    grad_h = autograd_of(model, supervised_loss(model, harmful))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad_h.values())).float() + 1e-7
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n] - alpha * grad_h[n] / norm)
    grad_shifted = autograd_of(model, supervised_loss(model, harmful))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return {n: grad_f[n] + lamb * (grad_h[n] - grad_shifted[n]) for n in grad_f}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_booster_gradient_matches_hand_computation(tiny_lora, grad_accum) -> None:
    defense = DEFENSES.get("booster")()
    trainer = make_trainer(tiny_lora, defense, grad_accum=grad_accum)
    defense.setup("alignment", trainer)
    batch, harmful = token_batch(4, seed=1), token_batch(10, seed=2)
    defense.harmful = Cycle(harmful)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch)
    expected = hand_booster(tiny_lora, batch, harmful, lamb=5.0, alpha=0.1)
    assert stats["harmful_loss_after_step"] < stats["harmful_loss"]  # w' is a descent step on h
    for name, value in expected.items():
        want = earlier[name] + value / grad_accum
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-4), name


def test_booster_defaults_and_validation() -> None:
    booster = DEFENSES.get("booster")()
    assert (booster.options.lamb, booster.options.alpha) == (5.0, 0.1)  # smooth_align.sh
    assert booster.options.harmful_batch_size == 10  # get_harmful_dataloader
    assert DEFENSES.get("booster").needs_provider_harmful
    with pytest.raises(ConfigError):
        DEFENSES.get("booster")(harmful_batch_size=0)
    with pytest.raises(ConfigError):
        DEFENSES.get("booster")(lambda_=1.0)


def test_booster_needs_provider_harmful(tiny_overrides) -> None:
    from hftlab.config import load_config
    from hftlab.context import RunContext

    config = load_config(None, [*tiny_overrides, "defense=booster"])
    with pytest.raises(ConfigError, match="provider_harmful"):
        RunContext(config, config.resolved_cache_dir() / "run")


def test_fine_tuning_continues_the_booster_adapter_by_default() -> None:
    """git-disl/Booster smooth_*.sh fine-tune with --alternating single_lora."""
    from hftlab.defenses import DEFENSES

    assert DEFENSES.get("booster")().continues_alignment_adapter()
    assert not DEFENSES.get("booster")(single_lora=False).continues_alignment_adapter()
