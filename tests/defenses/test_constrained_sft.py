"""Constrained SFT: the β schedule and token weights equal the reference's formulas on fixed
numbers, and the gradient left in .grad equals autograd of the paper's objective
Σ_t (2/β_t)·log(1 + exp(−β_t·Δ_t)) / N, computed here from the full model's logits with the
adapters switched off for π_aligned."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import autograd_of, make_trainer, step_keeping_earlier_grads, token_batch

from hftlab.config import ConfigError, load_config
from hftlab.defenses import DEFENSES
from hftlab.defenses.constrained_sft import (
    constrained_loss,
    position_betas,
    response_positions,
    token_weights,
)
from hftlab.train import IGNORE_INDEX, supervised_loss


def constrained(**options):
    return DEFENSES.get("constrained_sft")(**options)


def reference_beta_list(length, beta=0.1, bias_factor=20.0, first=5.0, bias_length=5):
    """The reference's get_beta_list, written out as a loop."""
    out = []
    for t in range(length):
        if t == 0 and bias_length > 0:
            out.append(beta * first)
        elif t < bias_length:
            out.append(beta * bias_factor)
        else:
            out.append(beta)
    return out


@pytest.mark.parametrize("bias_length", [0, 1, 5])
def test_betas_follow_reference_schedule(bias_length) -> None:
    positions = torch.arange(8)
    got = position_betas(positions, 0.1, 20.0, 5.0, bias_length)
    want = reference_beta_list(8, bias_length=bias_length)
    assert torch.allclose(got, torch.tensor(want))
    if bias_length == 5:  # finetune.py defaults: 0.5 for the first token, 2 for the next four
        assert got.tolist() == pytest.approx([0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1])


def test_weights_and_loss_match_formula_on_fixed_log_probs() -> None:
    policy = torch.tensor([-0.5, -2.0, -0.1, -3.0, -1.0], requires_grad=True)
    aligned = torch.tensor([-1.0, -1.0, -4.0, -3.0, -0.2])
    betas = torch.tensor([0.5, 2.0, 2.0, 0.1, 0.1])
    weights = token_weights(policy, aligned, betas)
    for i in range(5):
        delta = policy[i].item() - aligned[i].item()
        want = max(2 * (1 - 1 / (1 + math.exp(-betas[i].item() * delta))), 1e-3)
        assert weights[i].item() == pytest.approx(want, rel=1e-5)
    assert weights[2].item() == pytest.approx(1e-3)  # Δ = 3.9, β = 2: clamped
    assert not weights.requires_grad
    loss = constrained_loss(policy, weights)
    assert loss.item() == pytest.approx(-(weights * policy.detach()).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(policy.grad, -weights / 5)
    # where the clamp is inactive that is the gradient of the paper's (2/β)·softplus(−β·Δ)
    p2 = policy.detach().clone().requires_grad_(True)
    (2 / betas * F.softplus(-betas * (p2 - aligned))).mean().backward()
    unclamped = weights > 1e-3
    assert torch.allclose(p2.grad[unclamped], policy.grad[unclamped], atol=1e-6)


def test_positions_count_from_the_start_of_each_response() -> None:
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 2:7] = 5  # targets at labels[:, 1:] columns 1..5
    labels[1, 4:6] = 5
    assert response_positions(labels).tolist() == [0, 1, 2, 3, 4, 0, 1]


def hand_objective(model, batch, opts):
    """(Σ_t (2/β_t)·softplus(−β_t·Δ_t) / N, weights) from full logits, position by position."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    terms, weights = [], []
    for row in range(batch.labels.shape[0]):
        t = 0
        for col in range(1, batch.labels.shape[1]):
            target = int(batch.labels[row, col])
            if target == IGNORE_INDEX:
                continue
            beta = reference_beta_list(t + 1, **opts)[t]
            delta = logp[row, col - 1, target] - ref_logp[row, col - 1, target]
            terms.append(2 / beta * F.softplus(-beta * delta))
            weights.append(2 * (1 - torch.sigmoid(beta * delta.detach())))
            t += 1
    return torch.stack(terms).mean(), torch.stack(weights)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_gradient_matches_autograd_of_paper_objective(tiny_lora, grad_accum) -> None:
    defense = constrained()
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=grad_accum)
    defense.setup("finetune", trainer)
    batch = token_batch(4, seed=3)
    _, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch, "finetune")
    opts = {"beta": 0.1, "bias_factor": 20.0, "first": 5.0, "bias_length": 5}
    objective, weights = hand_objective(tiny_lora, batch, opts)
    assert bool((weights > 1e-3).all())  # the clamp is inactive: the gradients must agree
    assert float((weights - 1).abs().max()) > 0.01  # and the constraint is active somewhere
    expected = autograd_of(tiny_lora, objective)
    plain = autograd_of(tiny_lora, supervised_loss(tiny_lora, batch))
    assert any(not torch.allclose(plain[n], expected[n], rtol=1e-3) for n in plain)
    for name, value in expected.items():
        want = earlier[name] + value / grad_accum
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-4), name
    report = defense.report("finetune")
    assert 0 < report["mean_weight_first_tokens"] < 2 and report["clamped_token_fraction"] == 0


def test_full_finetuning_uses_a_frozen_copy_and_starts_as_sft(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    defense = constrained()
    trainer = make_trainer(model, defense, stage="finetune")
    defense.setup("finetune", trainer)
    assert defense.frozen is not None and defense.frozen is not model
    batch = token_batch(4, seed=5)
    # at the start π_θ = π_aligned: every weight is 2·(1 − σ(0)) = 1, i.e. plain SFT
    loss = defense.loss("finetune", trainer, batch)
    assert loss.item() == pytest.approx(supervised_loss(model, batch).item(), rel=1e-5)
    first, frozen_first = next(model.parameters()), next(defense.frozen.parameters())
    assert torch.equal(first, frozen_first)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not torch.equal(first, frozen_first)  # the reference does not follow the model
    moved = defense.loss("finetune", trainer, batch)
    assert moved.item() != pytest.approx(supervised_loss(model, batch).item(), rel=1e-5)


def test_adam_beta1_is_set_on_the_stage_optimizer(tiny_lora) -> None:
    for beta1, want in ((0.5, 0.5), (None, 0.9)):
        defense = constrained(adam_beta1=beta1)
        trainer = make_trainer(tiny_lora, defense, stage="finetune")
        trainer.optimizer = torch.optim.AdamW(trainer.trainable_parameters(), lr=1e-3)
        defense.setup("finetune", trainer)
        assert all(g["betas"] == (want, 0.999) for g in trainer.optimizer.param_groups)


def test_defaults_and_validation() -> None:
    o = constrained().options
    # Unispac/shallow-vs-deep-alignment finetune.py ScriptArguments and README soft_sft commands
    assert (o.beta, o.bias_factor, o.first_token_bias_factor, o.bias_length) == (0.1, 20, 5, 5)
    assert o.adam_beta1 == 0.5  # finetune.py: adam_beta1 = 0.5 unless safety_augmentation
    assert DEFENSES.get("constrained_sft").stages == ("finetune",)
    for bad in ({"beta": 0.0}, {"bias_factor": -1.0}, {"first_token_bias_factor": 0.0},
                {"bias_length": -1}, {"adam_beta1": 1.0}, {"temperature": 1.0}):
        with pytest.raises(ConfigError):
            constrained(**bad)


def test_constrained_sft_pipeline_runs(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline

    config = load_config(None, [*tiny_overrides, "defense=constrained_sft"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    info = json.loads((tmp_path / "run" / "finetune" / "stage.json").read_text())
    assert math.isfinite(info["final_loss"])
    report = info["defense_report"]
    assert 0 < report["mean_weight_first_tokens"] <= 2
    assert 0 < report["mean_weight_later_tokens"] <= 2
