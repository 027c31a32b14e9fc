"""EWC: the Fisher equals the squared gradients of each alignment batch's mean loss summed over the
batches (by autograd on the LoRA factors, or on the adapted weight matrices themselves), it is
exactly zero for a fresh adapter's A, and the gradient left in .grad is ∇CE plus
2λF ⊙ (w − w_init) (or autograd of λΣF ⊙ (s·B·A − s·B₀·A₀)² for the effective weights)."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import (
    PAD_ID,
    assert_grads_close,
    assert_step_is_plain_sft,
    autograd_of,
    lora_model,
    make_trainer,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
    token_items,
)
from peft.tuners.lora import LoraLayer

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import collate, supervised_loss

ALIGNMENT_ITEMS = token_items(7, seed=5)


def ewc(**options):
    return DEFENSES.get("ewc")(**options)


def ewc_trainer(model, defense, items=ALIGNMENT_ITEMS, grad_accum=1):
    return make_trainer(model, defense, stage="finetune", grad_accum=grad_accum,
                        alignment_items=items)


def hand_batches(items, size):
    return [collate(items[i : i + size], PAD_ID) for i in range(0, len(items), size)]


def hand_fisher_trainable(model, batches):
    fisher = {}
    for batch in batches:
        for name, grad in autograd_of(model, supervised_loss(model, batch)).items():
            fisher[name] = fisher.get(name, 0) + grad**2
    return fisher


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def hand_fisher_weights(model, batches):
    """Squared gradients of the frozen base weights of every adapted layer, by autograd."""
    weights = [m.get_base_layer().weight for m in lora_layers(model)]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(supervised_loss(model, batch), weights)
        for acc, g in zip(fisher, grads):
            acc += g**2
    for w in weights:
        w.requires_grad_(False)
    return fisher


def test_trainable_fisher_matches_squared_batch_gradients(tiny_lora) -> None:
    defense = ewc(space="trainable", fisher_batch_size=3, fisher_rows=5)
    trainer = ewc_trainer(tiny_lora, defense)
    defense.setup("finetune", trainer)
    expected = hand_fisher_trainable(tiny_lora, hand_batches(ALIGNMENT_ITEMS[:5], 3))
    names = [n for n, p in tiny_lora.named_parameters() if p.requires_grad]
    assert len(defense.fisher) == len(names) == len(expected)
    for name, got in zip(names, defense.fisher):
        assert torch.allclose(got, expected[name], atol=1e-10, rtol=1e-4), name
    assert all(p.grad is None for p in tiny_lora.parameters())  # the Fisher pass leaves no .grad
    assert defense.fisher_info.pop("fisher_seconds") >= 0
    assert defense.fisher_info == {
        "space": "trainable", "fisher_rows": 5, "fisher_batches": 2,
        "fisher_sum": pytest.approx(sum(float(f.sum()) for f in expected.values()), rel=1e-4),
    }


def test_fresh_adapter_has_zero_fisher_for_lora_a(tiny_model_dir) -> None:
    model = lora_model(tiny_model_dir, layers_lora_b=0.0)  # B = 0: ∂L/∂A = s·Bᵀ(∂L/∂y)xᵀ = 0
    defense = ewc(space="trainable")
    defense.setup("finetune", ewc_trainer(model, defense))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, fisher in zip(names, defense.fisher):
        if "lora_A" in name:
            assert torch.count_nonzero(fisher) == 0, name
        else:
            assert fisher.abs().sum() > 0, name


def test_weights_fisher_matches_squared_weight_gradients(tiny_lora) -> None:
    defense = ewc(space="weights", fisher_batch_size=4)
    trainer = ewc_trainer(tiny_lora, defense)
    defense.setup("finetune", trainer)
    assert defense.space == "weights"
    expected = hand_fisher_weights(tiny_lora, hand_batches(ALIGNMENT_ITEMS, 4))
    assert [layer.module for layer in defense.layers] == lora_layers(tiny_lora)
    assert len(defense.fisher) == len(expected) == 14  # 7 linear layers per block, 2 blocks
    for got, want in zip(defense.fisher, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-4)
    assert all(p.grad is None for p in tiny_lora.parameters())


def perturb(model, scale=0.02, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainable_penalty_gradient_is_2_lambda_f_times_shift(tiny_lora, grad_accum) -> None:
    lamb = 300.0
    defense = ewc(space="trainable", lamb=lamb, fisher_batch_size=3)
    trainer = ewc_trainer(tiny_lora, defense, grad_accum=grad_accum)
    defense.setup("finetune", trainer)
    params = {n: p for n, p in tiny_lora.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    fisher = dict(zip(params, defense.fisher))
    perturb(tiny_lora)
    batch = token_batch(4, seed=1)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch,
                                                     stage="finetune")
    shift = {n: p.detach() - start[n] for n, p in params.items()}
    value = lamb * sum((fisher[n] * shift[n] ** 2).sum() for n in params)
    assert stats["ewc_penalty"] == pytest.approx(value.item(), rel=1e-4)
    ce = supervised_loss(tiny_lora, batch)
    assert stats["loss"] == pytest.approx(ce.item(), rel=1e-5)
    grad_ce = autograd_of(tiny_lora, ce)
    penalty_grad = {n: 2 * lamb * fisher[n] * shift[n] for n in params}
    assert max(g.abs().max() for g in penalty_grad.values()) > 1e-3  # the penalty matters
    assert_grads_close(got, {n: grad_ce[n] + penalty_grad[n] for n in params}, earlier,
                       grad_accum)


def test_weights_penalty_gradient_matches_autograd(tiny_lora) -> None:
    lamb = 3e4
    defense = ewc(space="weights", lamb=lamb, fisher_batch_size=3)
    trainer = ewc_trainer(tiny_lora, defense, grad_accum=2)
    defense.setup("finetune", trainer)
    layers = lora_layers(tiny_lora)
    start = [m.get_delta_weight("default").detach().clone() for m in layers]  # B₀ ≠ 0 here
    fisher = list(defense.fisher)
    perturb(tiny_lora)
    batch = token_batch(4, seed=1)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch,
                                                     stage="finetune")
    penalty = lamb * sum((f * (m.get_delta_weight("default") - s) ** 2).sum()
                         for m, f, s in zip(layers, fisher, start))
    assert stats["ewc_penalty"] == pytest.approx(penalty.item(), rel=1e-4)
    grad_penalty = autograd_of(tiny_lora, penalty)
    assert max(g.abs().max() for g in grad_penalty.values()) > 1e-3
    grad_ce = autograd_of(tiny_lora, supervised_loss(tiny_lora, batch))
    assert_grads_close(got, {n: g + grad_penalty[n] for n, g in grad_ce.items()}, earlier,
                       grad_accum=2)


def test_penalty_is_zero_at_the_start(tiny_model_dir) -> None:
    model = lora_model(tiny_model_dir, layers_lora_b=0.0)
    for space in ("alignment_adapter", "weights", "trainable"):
        defense = ewc(space=space)
        trainer = ewc_trainer(model, defense)
        defense.setup("finetune", trainer)
        stats = assert_step_is_plain_sft(defense, trainer, model, token_batch(4, seed=2))
        assert stats["ewc_penalty"] == 0.0


def test_full_fine_tuning_is_exact_ewc(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    defense = ewc(space="weights")  # under full fine-tuning the weights are the parameters
    defense.setup("finetune", ewc_trainer(model, defense, items=ALIGNMENT_ITEMS[:3]))
    assert defense.space == "trainable"
    assert len(defense.fisher) == len(list(model.parameters()))


def test_ewc_needs_alignment_data(tiny_lora) -> None:
    defense = ewc()
    trainer = ewc_trainer(tiny_lora, defense, items=[])
    with pytest.raises(ConfigError, match="alignment"):
        defense.setup("finetune", trainer)


def test_ewc_is_plain_sft_outside_fine_tuning(tiny_lora) -> None:
    defense = ewc()
    trainer = make_trainer(tiny_lora, defense, stage="alignment")
    defense.setup("alignment", trainer)
    assert_step_is_plain_sft(defense, trainer, tiny_lora, token_batch(4, seed=4), "alignment")


def test_ewc_defaults_and_validation() -> None:
    # git-disl/Vaccine script/EWC_finetune/sst2.sh: lamb=${4:-1e9}; train.py: the Fisher set is
    # the 2000-row BeaverTails_safe alignment set at per_device_eval_batch_size 5 (400 batches),
    # over the reused alignment LoRA ("EWC REUSE THE SAME LORA")
    options = ewc().options
    assert options.lamb == 1e9
    assert (options.fisher_rows, options.fisher_batch_size) == (2000, 5)
    assert options.space == "alignment_adapter" and ewc().continues_alignment_adapter()
    assert not ewc(space="weights").continues_alignment_adapter()
    assert not ewc(space="trainable").continues_alignment_adapter()
    assert DEFENSES.get("ewc").stages == ("finetune",)
    with pytest.raises(ConfigError, match="space"):
        ewc(space="lora")
    with pytest.raises(ConfigError, match="fisher_rows"):
        ewc(fisher_rows=0)
    with pytest.raises(ConfigError, match="lamb"):
        ewc(lamb=-1.0)
    with pytest.raises(ConfigError):
        ewc(rho=1.0)


def test_ewc_end_to_end(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=ewc",
                      "defense_args={space: weights, fisher_rows: 8, fisher_batch_size: null, "
                      "lamb: 1000.0}", "finetune.train.max_steps=3")
    report = stage_info(tmp_path)["defense_report"]
    assert (report["space"], report["fisher_rows"], report["fisher_batches"]) == ("weights", 8, 2)
    assert report["fisher_sum"] > 0
    assert report["ewc_penalty_first"] == 0.0  # the fresh adapter starts at ΔW = 0
    assert math.isfinite(report["ewc_penalty_last"]) and report["ewc_penalty_last"] >= 0
