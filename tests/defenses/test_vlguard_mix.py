"""VLGuard mixing: the applied gradient equals ∇CE(user batch) + λ·∇CE(alignment batch), each
term computed separately with autograd; the alignment batches come from the provider's data."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import (
    Cycle,
    alignment_view,
    assert_grads_close,
    autograd_of,
    make_trainer,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
    token_items,
)

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.train import supervised_loss


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_vlguard_gradient_matches_hand_computation(tiny_lora, grad_accum) -> None:
    lamb = 0.5
    defense = DEFENSES.get("vlguard_mix")(lamb=lamb)
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=grad_accum,
                           alignment_items=token_items(8, seed=7))
    defense.setup("finetune", trainer)
    user, aligned = token_batch(4, seed=1), token_batch(4, seed=2)
    defense.alignment = Cycle(aligned)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, user,
                                                     stage="finetune")
    grad_user = autograd_of(tiny_lora, supervised_loss(tiny_lora, user))
    grad_align = autograd_of(tiny_lora, supervised_loss(tiny_lora, aligned))
    with torch.no_grad():
        losses = float(supervised_loss(tiny_lora, user)), float(supervised_loss(tiny_lora, aligned))
    assert (stats["loss"], stats["alignment_loss"]) == pytest.approx(losses, rel=1e-5)
    expected = {n: g + lamb * grad_align[n] for n, g in grad_user.items()}
    assert_grads_close(got, expected, earlier, grad_accum)
    assert defense.report("finetune")["lamb"] == lamb


def test_vlguard_alignment_stream(tiny_lora) -> None:
    defense = DEFENSES.get("vlguard_mix")()
    trainer = make_trainer(tiny_lora, defense, stage="finetune",
                           alignment_items=token_items(8, seed=7))
    defense.setup("finetune", trainer)
    assert defense.alignment.batch_size == 4
    assert defense.alignment.next().input_ids.shape[0] == 4
    empty = DEFENSES.get("vlguard_mix")()
    trainer.run = alignment_view([])
    with pytest.raises(ConfigError, match="alignment data"):
        empty.setup("finetune", trainer)


def test_vlguard_defaults_and_validation() -> None:
    vlguard = DEFENSES.get("vlguard_mix")()
    # git-disl/Booster script/finetune/united/vlguard_lamb.sh: lamb=${1:-0.1};
    # trainer.py VlguardTrainer.get_alignment_dataloader: batch_size 4.
    assert vlguard.options.lamb == 0.1
    assert vlguard.options.alignment_batch_size == 4
    assert vlguard.stages == ("finetune",)
    for bad in ({"lamb": -1.0}, {"alignment_batch_size": 0}, {"rho": 1.0}):
        with pytest.raises(ConfigError):
            DEFENSES.get("vlguard_mix")(**bad)


def test_vlguard_end_to_end(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=vlguard_mix",
                      "finetune.train.max_steps=3")
    stage = stage_info(tmp_path)
    report = stage["defense_report"]
    assert math.isfinite(stage["final_loss"])
    assert math.isfinite(report["alignment_loss_first"])
    assert math.isfinite(report["alignment_loss_last"])
