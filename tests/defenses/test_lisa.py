"""Lisa: the state schedule equals the reference's ``check_mode`` rule, the snapshot w̃ is the
weights at the last switch, and the applied gradient is ∇CE(batch of the state) + ρ(w − w̃),
each part computed separately by hand."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import (
    Cycle,
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
from hftlab.defenses.lisa import ALIGN_STATE, CPU_PRESET, FINETUNE_STATE, lisa_state
from hftlab.train import supervised_loss


def lisa_setup(model, grad_accum: int = 1, **options):
    defense = DEFENSES.get("lisa")(**options)
    # max_steps 20 plans 20 steps (as train() records them): the proximal term is on for step > 2
    trainer = make_trainer(model, defense, stage="finetune", grad_accum=grad_accum, max_steps=20,
                           alignment_items=token_items(8, seed=7))
    trainer.total_steps = trainer.plan(40)[1]
    defense.setup("finetune", trainer)
    return defense, trainer


def reference_states(alignment_step: int, finetune_step: int, n: int) -> list[str]:
    """git-disl/Lisa trainer.py ADMMTrainer.init + check_mode, transcribed: the state of each of
    the first ``n`` training steps (guide data present)."""
    status = ALIGN_STATE if alignment_step != 0 else FINETUNE_STATE
    clock = steps = 0
    states = []
    for _ in range(n):
        if status == ALIGN_STATE:
            if clock % alignment_step == 0 and steps != 0 and finetune_step != 0:
                status, clock = FINETUNE_STATE, 0
        elif clock % finetune_step == 0 and steps != 0 and alignment_step != 0:
            status, clock = ALIGN_STATE, 0
        states.append(status)
        steps += 1
        clock += 1
    return states


@pytest.mark.parametrize(("a", "f", "n"), [(3, 7, 40), (1, 1, 10), (100, 900, 2500),
                                           (0, 5, 12), (5, 0, 12), (2, 1, 9)])
def test_lisa_schedule_matches_reference_rule(a, f, n) -> None:
    assert [lisa_state(s, a, f) for s in range(n)] == reference_states(a, f, n)


def lisa_trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def move_weights(model, seed: int) -> None:
    """Stand-in for optimizer steps: shift every trainable weight by a seeded random amount."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lisa_trainable(model).values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lisa_trainable(model).items()}


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("state", [FINETUNE_STATE, ALIGN_STATE])
def test_lisa_gradient_matches_hand_computation(tiny_lora, grad_accum, state) -> None:
    rho = 0.5
    defense, trainer = lisa_setup(tiny_lora, grad_accum, alignment_step=3, finetune_step=7,
                                  rho=rho)
    user, aligned = token_batch(4, seed=1), token_batch(4, seed=2)
    defense.alignment = Cycle(aligned)
    move_weights(tiny_lora, seed=10)
    trainer.step = 3  # first fine-tuning step: switch, w̃ := the weights now
    defense.training_step("finetune", trainer, user)
    tiny_lora.zero_grad(set_to_none=True)
    anchor = snapshot(tiny_lora)
    if state == ALIGN_STATE:
        move_weights(tiny_lora, seed=11)
        trainer.step = 10  # first alignment step of the second cycle: switch again
        defense.training_step("finetune", trainer, user)
        tiny_lora.zero_grad(set_to_none=True)
        anchor = snapshot(tiny_lora)
    move_weights(tiny_lora, seed=12)
    trainer.step = 11 if state == ALIGN_STATE else 5
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, user,
                                                     stage="finetune")
    trained_on = aligned if state == ALIGN_STATE else user  # the user batch is unused then
    grad_ce = autograd_of(tiny_lora, supervised_loss(tiny_lora, trained_on))
    params = lisa_trainable(tiny_lora)
    distance = sum(float((params[n].detach() - anchor[n]).pow(2).sum()) for n in params)
    assert stats["alignment_state"] == float(state == ALIGN_STATE)
    assert stats["proximal"] == pytest.approx(rho / 2 * distance, rel=1e-5)
    assert distance > 0
    expected = {n: g + rho * (params[n].detach() - anchor[n]) for n, g in grad_ce.items()}
    assert_grads_close(got, expected, earlier, grad_accum)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lisa_runs_the_schedule_and_snapshots_at_the_switch(tiny_lora, grad_accum) -> None:
    defense, trainer = lisa_setup(tiny_lora, grad_accum, alignment_step=3, finetune_step=7)
    aligned = Cycle(token_batch(4, seed=2))
    defense.alignment = aligned
    start = snapshot(tiny_lora)
    assert all(torch.equal(a, start[n]) for a, n in zip(defense.anchor, start))
    delta = {n: torch.full_like(p, 1e-3) for n, p in lisa_trainable(tiny_lora).items()}
    expected = reference_states(3, 7, 25)
    last_switch = None
    for step in range(25):
        with torch.no_grad():  # the weights "after step" optimizer steps: start + step·δ
            for n, p in lisa_trainable(tiny_lora).items():
                p.copy_(start[n] + step * delta[n])
        trainer.step = step
        if step and expected[step] != expected[step - 1]:
            last_switch = step
        for _ in range(grad_accum):
            stats = defense.training_step("finetune", trainer, token_batch(4, seed=1))
            assert stats["alignment_state"] == float(expected[step] == ALIGN_STATE)
            assert (stats["proximal"] > 0) == (step > 2 and step != last_switch)
        tiny_lora.zero_grad(set_to_none=True)
        anchor_step = last_switch or 0  # w̃ = the weights when the current state began
        for a, n in zip(defense.anchor, start):
            assert torch.allclose(a, start[n] + anchor_step * delta[n], atol=1e-7), (step, n)
    # steps 0-2, 10-12, 20-22 align; switches at 3, 10, 13, 20, 23
    assert aligned.calls == 9 * grad_accum
    report = defense.report("finetune")
    assert report["alignment_steps"] == 9 and report["finetune_steps"] == 16
    assert report["user_batches_unused"] == 9 * grad_accum
    assert report["switches"] == 5
    assert report["proximal_from_step"] == 3  # steps > 0.1 · 20 planned steps


def test_lisa_defaults_presets_and_validation() -> None:
    lisa = DEFENSES.get("lisa")()
    # git-disl/Lisa script/finetune/lisa_poison_ratio.sh: align_step=100, finetune_step=900,
    # RHO=1; trainer.py ADMMTrainer: proximal term when steps > 0.1 · total steps.
    assert (lisa.options.alignment_step, lisa.options.finetune_step) == (100, 900)
    assert lisa.options.rho == 1.0
    assert lisa.options.proximal_after == 0.1
    assert lisa.stages == ("finetune",)
    preset = DEFENSES.get("lisa")(**CPU_PRESET).options
    assert preset.alignment_step + preset.finetune_step == 25  # one cpu_sst2 epoch per cycle
    assert preset.rho == 1.0
    for bad in ({"rho": -1.0}, {"alignment_step": -1}, {"alignment_step": 0, "finetune_step": 0},
                {"proximal_after": 1.5}, {"lamb": 1.0}):
        with pytest.raises(ConfigError):
            DEFENSES.get("lisa")(**bad)


def test_lisa_needs_alignment_data(tiny_lora) -> None:
    defense = DEFENSES.get("lisa")()
    trainer = make_trainer(tiny_lora, defense, stage="finetune", max_steps=4, alignment_items=[])
    with pytest.raises(ConfigError, match="alignment data"):
        defense.setup("finetune", trainer)


def test_lisa_end_to_end(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=lisa",
                      "defense_args={alignment_step: 1, finetune_step: 2}",
                      "finetune.train.max_steps=4")
    stage = stage_info(tmp_path)
    report = stage["defense_report"]
    assert math.isfinite(stage["final_loss"])
    assert (report["alignment_steps"], report["finetune_steps"]) == (2, 2)  # A F F A
    assert report["switches"] == 2  # at steps 1 and 3
    assert report["proximal_from_step"] == 1  # steps > 0.1 · 4
