"""KL: the regulariser equals Σ_positions KL(p_aligned ‖ p_w) / batch size over the vocabulary,
computed by hand from the full logits of the model with the adapters off and on (torch's
``kl_div``), at every real position or only at the answer positions; the gradient in .grad is
autograd of CE + λ·KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import (
    assert_grads_close,
    assert_step_is_plain_sft,
    autograd_of,
    lora_model,
    make_trainer,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
)

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import IGNORE_INDEX, supervised_loss


def kl_defense(**options):
    return DEFENSES.get("kl")(**options)


def hand_kl(model, batch, positions):
    """(CE, KL) from the full (batch, sequence, vocabulary) logits of both models."""
    with torch.no_grad(), model.disable_adapter():
        aligned = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    current = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_position = F.kl_div(F.log_softmax(current, dim=-1), F.log_softmax(aligned, dim=-1),
                            reduction="none", log_target=True).sum(-1)
    if positions == "all":
        where = batch.attention_mask.bool()
    else:
        where = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        where[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    kl = per_position[where].sum() / batch.input_ids.shape[0]
    return supervised_loss(model, batch), kl


@pytest.mark.parametrize(("positions", "grad_accum"), [("all", 1), ("all", 2), ("supervised", 1)])
def test_kl_term_and_gradient_match_hand_computation(tiny_lora, positions, grad_accum) -> None:
    lamb = 0.7
    defense = kl_defense(lamb=lamb, positions=positions)
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=grad_accum)
    defense.setup("finetune", trainer)
    batch = token_batch(4, seed=1)
    assert not batch.attention_mask.all()  # padding present, and left out
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch,
                                                     stage="finetune")
    ce, kl = hand_kl(tiny_lora, batch, positions)
    assert kl.item() > 1e-4
    assert stats["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert stats["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert_grads_close(got, autograd_of(tiny_lora, ce + lamb * kl), earlier, grad_accum)


def test_all_positions_include_the_prompt(tiny_lora) -> None:
    batch = token_batch(4, seed=1)
    _, kl_all = hand_kl(tiny_lora, batch, "all")
    _, kl_answer = hand_kl(tiny_lora, batch, "supervised")
    assert kl_all.item() > kl_answer.item() > 0


def test_kl_is_zero_at_the_start_of_fine_tuning(tiny_model_dir) -> None:
    model = lora_model(tiny_model_dir, layers_lora_b=0.0)  # fresh adapter: B = 0
    defense = kl_defense(lamb=5.0)
    trainer = make_trainer(model, defense, stage="finetune")
    defense.setup("finetune", trainer)
    stats = assert_step_is_plain_sft(defense, trainer, model, token_batch(4, seed=2), atol=1e-6)
    assert abs(stats["kl"]) < 1e-6


def test_kl_full_fine_tuning_uses_a_frozen_copy(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    defense = kl_defense()
    trainer = make_trainer(model, defense, stage="finetune")
    defense.setup("finetune", trainer)
    assert defense.frozen is not None and defense.frozen is not model
    batch = token_batch(4, seed=3)
    assert abs(defense.training_step("finetune", trainer, batch)["kl"]) < 1e-6
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.05)
    assert defense.training_step("finetune", trainer, batch)["kl"] > 1e-6


def test_kl_is_plain_sft_outside_fine_tuning(tiny_lora) -> None:
    defense = kl_defense()
    trainer = make_trainer(tiny_lora, defense, stage="alignment")
    assert_step_is_plain_sft(defense, trainer, tiny_lora, token_batch(4, seed=4), "alignment")


def test_kl_defaults_and_validation() -> None:
    # git-disl/Vaccine script/KL_finetune/sst2.sh: lamb=${3:-0.1}; trainer.py KLTrainer takes
    # the logits of every position of the batch
    options = kl_defense().options
    assert (options.lamb, options.positions) == (0.1, "all")
    assert DEFENSES.get("kl").stages == ("finetune",)
    with pytest.raises(ConfigError, match="positions"):
        kl_defense(positions="prompt")
    with pytest.raises(ConfigError, match="lamb"):
        kl_defense(lamb=-0.1)
    with pytest.raises(ConfigError):
        kl_defense(beta=1.0)


def test_kl_end_to_end(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=kl", "finetune.train.max_steps=3")
    report = stage_info(tmp_path)["defense_report"]
    assert abs(report["kl_first"]) < 1e-6  # the fresh adapter starts at B = 0
    assert math.isfinite(report["kl_last"]) and report["kl_last"] >= 0
