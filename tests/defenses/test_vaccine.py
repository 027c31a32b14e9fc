"""Vaccine's update against a hand computation: ε = ρ·g/‖g‖ at every attention output, one norm
over all layers, and the gradient of the perturbed loss is what the optimizer receives."""

from __future__ import annotations

import pytest
import torch
from defense_helpers import autograd_of, make_trainer, param_grads, token_batch

import hftlab.defenses.vaccine as vaccine_module
from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import supervised_loss


def attention_of(model):
    return [layer.self_attn for layer in model.get_base_model().model.layers]


def hand_vaccine_grads(model, batch, rho):
    """Independent computation with plain forward hooks and autograd."""
    modules = attention_of(model)
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out[0]))
               for i, m in enumerate(modules)]
    loss = supervised_loss(model, batch)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(modules))])
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
    eps = [rho * g / (norm + 1e-7) for g in grads]
    handles = [m.register_forward_hook(lambda mod, a, out, e=e: (out[0] + e, *out[1:]))
               for m, e in zip(modules, eps)]
    perturbed = supervised_loss(model, batch)
    for h in handles:
        h.remove()
    return autograd_of(model, perturbed), eps, perturbed


def test_perturbation_has_norm_rho_over_all_layers() -> None:
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    eps = vaccine_module.perturbation(grads, rho=2.0)
    assert torch.allclose(eps[0], torch.tensor([[1.2, 0.0]]), atol=1e-6)  # 2·3/5
    assert torch.allclose(eps[1], torch.tensor([[0.0, 1.6]]), atol=1e-6)  # 2·4/5


def test_vaccine_step_matches_hand_computation(tiny_lora, monkeypatch) -> None:
    defense = DEFENSES.get("vaccine")()
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    batch = token_batch(4, seed=1)
    applied = {}
    real = vaccine_module.add_to_outputs

    def spy(modules, deltas):
        applied["modules"], applied["deltas"] = modules, deltas
        return real(modules, deltas)

    monkeypatch.setattr(vaccine_module, "add_to_outputs", spy)
    stats = defense.training_step("alignment", trainer, batch)
    got = param_grads(tiny_lora)
    tiny_lora.zero_grad(set_to_none=True)
    expected, eps, perturbed = hand_vaccine_grads(tiny_lora, batch, rho=2.0)

    assert applied["modules"] == attention_of(tiny_lora)  # every block's self-attention
    total = torch.sqrt(sum((d.double() ** 2).sum() for d in applied["deltas"]))
    assert total.item() == pytest.approx(2.0, rel=1e-5)  # ‖ε‖ = ρ over all layers together
    for d, e in zip(applied["deltas"], eps):
        assert torch.allclose(d, e, atol=1e-6)
    assert stats["loss"] == pytest.approx(float(perturbed.detach()), rel=1e-5)
    assert stats["loss"] > stats["clean_loss"]  # ε points uphill
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-4), name


def test_vaccine_block_target_and_options(tiny_lora) -> None:
    defense = DEFENSES.get("vaccine")(perturb="block", rho=0.5)
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    assert defense.modules == list(tiny_lora.get_base_model().model.layers)
    assert DEFENSES.get("vaccine")().options.rho == 2.0  # reference default
    with pytest.raises(ConfigError, match="perturb"):
        DEFENSES.get("vaccine")(perturb="mlp")
    with pytest.raises(ConfigError):
        DEFENSES.get("vaccine")(radius=1.0)


def test_vaccine_is_plain_sft_outside_alignment(tiny_lora) -> None:
    defense = DEFENSES.get("vaccine")()
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    batch = token_batch(4, seed=2)
    defense.training_step("finetune", trainer, batch)
    got = param_grads(tiny_lora)
    tiny_lora.zero_grad(set_to_none=True)
    expected = autograd_of(tiny_lora, supervised_loss(tiny_lora, batch))
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-7)
