"""LDIFS: the loss (and the gradient left in .grad) equals
CE + Σ_l ρ/2·‖mlp_l(w) − mlp_l(w_aligned)‖² over the real tokens, both computed separately with
plain hooks on the model with the adapters on and off; terms at or above the reference's 0.1
threshold are dropped; the aligned model of full fine-tuning is a frozen copy."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import (
    assert_grads_close,
    assert_step_is_plain_sft,
    autograd_of,
    lora_model,
    make_trainer,
    param_grads,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
)

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import supervised_loss


def ldifs(**options):
    return DEFENSES.get("ldifs")(**options)


def mlps(model):
    return [layer.mlp for layer in model.get_base_model().model.layers]


def hand_terms(model, batch, rho):
    """(CE, [ρ/2 · Σ_real tokens ‖mlp_l(w) − mlp_l(w_aligned)‖² per layer]) with autograd."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, out))
             for i, m in enumerate(mlps(model))]
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    aligned = {i: t.detach().clone() for i, t in seen.items()}
    ce = supervised_loss(model, batch)
    for h in hooks:
        h.remove()
    real = batch.attention_mask.bool()
    terms = [rho / 2 * ((seen[i] - aligned[i])[real] ** 2).sum() for i in range(len(aligned))]
    return ce, terms


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ldifs_loss_and_gradient_match_hand_computation(tiny_lora, grad_accum) -> None:
    rho = 20.0
    defense = ldifs(rho=rho, max_layer_term=None)
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=grad_accum)
    defense.setup("finetune", trainer)
    assert defense.modules == mlps(tiny_lora)  # every block's MLP output
    batch = token_batch(4, seed=1)
    assert not batch.attention_mask.all()  # padding is present and must be left out
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch,
                                                     stage="finetune")
    ce, terms = hand_terms(tiny_lora, batch, rho)
    penalty = sum(terms)
    assert penalty.item() > 1e-2 * ce.item()  # the adapters move the features
    assert stats["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert stats["ldifs_penalty"] == pytest.approx(penalty.item(), rel=1e-4)
    assert stats["layers_kept"] == len(terms) == 2
    assert_grads_close(got, autograd_of(tiny_lora, ce + penalty), earlier, grad_accum)


def test_ldifs_drops_layers_at_or_above_the_threshold(tiny_lora) -> None:
    rho = 20.0
    batch = token_batch(4, seed=1)
    ce, terms = hand_terms(tiny_lora, batch, rho)
    low, high = sorted(t.item() for t in terms)
    assert high > 1.01 * low
    defense = ldifs(rho=rho, max_layer_term=(low + high) / 2)
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    tiny_lora.zero_grad(set_to_none=True)
    stats = defense.training_step("finetune", trainer, batch)
    got = param_grads(tiny_lora)
    tiny_lora.zero_grad(set_to_none=True)
    ce, terms = hand_terms(tiny_lora, batch, rho)
    kept = min(terms, key=lambda t: t.item())  # only the layer below the threshold
    assert stats["layers_kept"] == 1
    assert stats["ldifs_penalty"] == pytest.approx(kept.item(), rel=1e-4)
    assert_grads_close(got, autograd_of(tiny_lora, ce + kept))


def test_ldifs_is_zero_at_the_start_of_fine_tuning(tiny_model_dir) -> None:
    model = lora_model(tiny_model_dir, layers_lora_b=0.0)  # fresh adapter: B = 0
    defense = ldifs(rho=1.0)
    trainer = make_trainer(model, defense, stage="finetune")
    defense.setup("finetune", trainer)
    stats = assert_step_is_plain_sft(defense, trainer, model, token_batch(4, seed=2))
    assert stats["ldifs_penalty"] == 0.0 and stats["layers_kept"] == 2


def test_ldifs_full_fine_tuning_uses_a_frozen_copy(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    defense = ldifs(rho=1.0, max_layer_term=None)
    trainer = make_trainer(model, defense, stage="finetune")
    defense.setup("finetune", trainer)
    assert defense.frozen is not None and defense.frozen is not model
    assert defense.aligned_modules == [layer.mlp for layer in defense.frozen.model.layers]
    batch = token_batch(4, seed=3)
    assert defense.training_step("finetune", trainer, batch)["ldifs_penalty"] == 0.0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    assert defense.training_step("finetune", trainer, batch)["ldifs_penalty"] > 0


def test_ldifs_is_plain_sft_outside_fine_tuning(tiny_lora) -> None:
    defense = ldifs()
    trainer = make_trainer(tiny_lora, defense, stage="alignment")
    assert_step_is_plain_sft(defense, trainer, tiny_lora, token_batch(4, seed=4), "alignment")


def test_ldifs_defaults_and_validation() -> None:
    # git-disl/Booster script/finetune/LDIFS_poison_ratio.sh: RHO=0.0001; trainer.py
    # LDIFSTrainer keeps a layer's term only if it is < 0.1
    options = ldifs().options
    assert (options.rho, options.max_layer_term) == (1e-4, 0.1)
    assert DEFENSES.get("ldifs").stages == ("finetune",)
    with pytest.raises(ConfigError, match="rho"):
        ldifs(rho=-1.0)
    with pytest.raises(ConfigError, match="max_layer_term"):
        ldifs(max_layer_term=0.0)
    with pytest.raises(ConfigError):
        ldifs(lamb=1.0)


def test_ldifs_end_to_end(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=ldifs", "defense_args={rho: 0.01}",
                      "finetune.train.max_steps=3")
    report = stage_info(tmp_path)["defense_report"]
    assert report["layers"] == 2
    assert report["ldifs_penalty_first"] == 0.0  # the fresh adapter starts at B = 0
    assert math.isfinite(report["ldifs_penalty_last"])
