"""T-Vaccine: layer probabilities ∝ harmful-gradient norms, sampling without replacement, and
only the sampled layers' attention adapters move (the reference's default; ``block`` freezes
whole blocks), with ‖ε‖ = ρ over the sampled layers' attention outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from defense_helpers import make_trainer, token_batch, token_items

import hftlab.defenses.vaccine as vaccine_module
from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.defenses.t_vaccine import layer_probabilities, sample_layers
from hftlab.train import supervised_loss


def test_layer_probabilities_are_normalised_gradient_norms() -> None:
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0]), torch.zeros(2)]
    assert np.allclose(layer_probabilities(grads), [0.5, 0.5, 0.0])
    assert np.allclose(layer_probabilities([torch.zeros(1), None]), [0.5, 0.5])


def test_sampling_is_without_replacement_and_follows_p() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.0, 0.7, 0.3, 0.0])
    for _ in range(20):
        assert sample_layers(rng, p, 2) == [1, 2]
    counts = np.zeros(4)
    for _ in range(2000):
        counts[sample_layers(rng, np.array([0.1, 0.2, 0.3, 0.4]), 1)] += 1
    assert np.allclose(counts / 2000, [0.1, 0.2, 0.3, 0.4], atol=0.04)


def test_probabilities_match_hand_gradient_norms(tiny_lora) -> None:
    defense = DEFENSES.get("t_vaccine")()
    harmful = token_items(1, seed=5)
    trainer = make_trainer(tiny_lora, defense, harmful_items=harmful)
    defense.setup("alignment", trainer)
    defense.score_layers(trainer)
    attn = [layer.self_attn for layer in tiny_lora.get_base_model().model.layers]
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o[0]))
               for i, m in enumerate(attn)]
    from hftlab.train import collate

    loss = supervised_loss(tiny_lora, collate(harmful, 0))
    for h in handles:
        h.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, [outs[0], outs[1]])]
    assert np.allclose(defense.probabilities, np.array(norms) / sum(norms), rtol=1e-5)


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_only_sampled_layers_move_and_are_perturbed(tiny_lora, monkeypatch, scope) -> None:
    defense = DEFENSES.get("t_vaccine")(active_layers=1, interval_steps=100, train_scope=scope)
    trainer = make_trainer(tiny_lora, defense, max_steps=3)
    applied = []
    real = vaccine_module.add_to_outputs

    def spy(modules, deltas):
        applied.append((modules, deltas))
        return real(modules, deltas)

    monkeypatch.setattr(vaccine_module, "add_to_outputs", spy)
    layers = tiny_lora.get_base_model().model.layers
    before = [{n: p.detach().clone() for n, p in layer.named_parameters() if "lora" in n}
              for layer in layers]
    result = trainer.train(token_items(12, seed=3))
    assert result.steps == 3 and len(defense.history) == 1
    (active,) = defense.history[0]
    for index, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            if "lora" not in name:
                continue
            # the reference freezes only attention adapters; "block" freezes the whole layer
            frozen = index != active and (scope == "block" or name.startswith("self_attn."))
            assert torch.equal(p, before[index][name]) == frozen, (index, name)
    for modules, deltas in applied:
        assert modules == [layers[active].self_attn]
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in deltas))
        assert norm.item() == pytest.approx(3.0, rel=1e-5)  # ρ = 3


def test_resampling_every_interval(tiny_lora) -> None:
    defense = DEFENSES.get("t_vaccine")(active_layers=1, interval_steps=2, probability_steps=4)
    trainer = make_trainer(tiny_lora, defense, max_steps=5)
    trainer.train(token_items(12, seed=3))
    assert len(defense.history) == 3  # steps 0, 2, 4


def test_defaults_scale_with_depth_and_validation(tiny_lora) -> None:
    defense = DEFENSES.get("t_vaccine")()
    o = defense.options
    assert (o.rho, o.interval_steps, o.probability_steps) == (3.0, 20, 200)
    assert (o.harmful_batch_size, o.train_scope) == (1, "attention")  # the reference trainer
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    assert defense.n_active == 1  # round(2 / 4) -> at least one
    defense.attention = [None] * 32
    assert defense.n_active == 8  # reference: 8 of 32
    defense.attention = [None] * 30
    assert defense.n_active == 8  # SmolLM2-135M
    with pytest.raises(ConfigError):
        DEFENSES.get("t_vaccine")(train_scope="mlp")
    with pytest.raises(ConfigError):
        DEFENSES.get("t_vaccine")(interval_steps=0)


def test_default_scope_freezes_only_unselected_attention_adapters(tiny_lora) -> None:
    """Reference ``unfreeze_activate_layers``: requires_grad is set on the attention modules'
    LoRA only, so the MLP adapters of unselected layers keep training."""
    defense = DEFENSES.get("t_vaccine")(active_layers=1)  # train_scope: attention (default)
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    defense.training_step("alignment", trainer, token_batch(4, seed=1))
    layers = tiny_lora.get_base_model().model.layers
    (active,) = defense.active
    inactive = layers[1 - active]
    attention = [p for n, p in inactive.self_attn.named_parameters() if "lora" in n]
    mlp = [p for n, p in inactive.mlp.named_parameters() if "lora" in n]
    assert attention and mlp
    assert all(not p.requires_grad and p.grad is None for p in attention)
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in mlp)
    selected = [p for n, p in layers[active].named_parameters() if "lora" in n]
    assert all(p.requires_grad and p.grad is not None for p in selected)


def test_block_scope_freezes_unselected_blocks(tiny_lora) -> None:
    defense = DEFENSES.get("t_vaccine")(active_layers=1, train_scope="block")
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    defense.training_step("alignment", trainer, token_batch(4, seed=1))
    inactive = tiny_lora.get_base_model().model.layers[1 - defense.active[0]]
    assert all(not p.requires_grad and p.grad is None
               for n, p in inactive.named_parameters() if "lora" in n)


def test_reference_settings_pin_the_reference() -> None:
    cls = DEFENSES.get("t_vaccine")
    options = cls().options_dict()
    # every key resolves: tests/test_defense_settings.py; here the reference values are pinned
    keys = [s.key for s in cls.reference_settings]
    assert len(keys) == len(set(keys))
    assert all(k.split(".", 1)[1] in options for k in keys if k.startswith("defense_args."))
    settings = {s.key: s.reference for s in cls.reference_settings}
    # ρ 3, 8 layers, resample every 20 steps, rescore every 200, attention-only freezing
    assert (settings["defense_args.rho"], settings["defense_args.active_layers"],
            settings["defense_args.interval_steps"],
            settings["defense_args.probability_steps"]) == (3.0, 8, 20, 200)
    for key in ("rho", "interval_steps", "probability_steps", "harmful_batch_size",
                "train_scope"):
        assert settings[f"defense_args.{key}"] == options[key], key
