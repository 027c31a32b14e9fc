"""TAR: the entropy objective, the tamper-resistance weights, an outer gradient equal to a hand
computation (attack with torch's AdamW, ∇ of minus the entropy at the attacked weights,
restore, retain CE + hidden-state distance), and the inner loop leaves the outer weights and the
trainer's optimizer untouched until the outer step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import (
    Cycle,
    autograd_of,
    make_trainer,
    step_keeping_earlier_grads,
    token_batch,
)

from hftlab.config import ConfigError, LoraConfig, TrainConfig, load_config
from hftlab.defenses import DEFENSES
from hftlab.defenses.tar import CPU_PRESET, entropy_loss, tamper_weights
from hftlab.model import attach_trainable
from hftlab.train import IGNORE_INDEX, supervised_loss


def tar(**options):
    return DEFENSES.get("tar")(**options)


def test_entropy_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, -1e4]])
    h_uniform = math.log(3)
    h_skewed = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # p = (1/2, 1/4, 1/4)
    h_two = math.log(2)  # the third class has probability ~0
    want = -(h_uniform + h_skewed + h_two) / 3
    assert entropy_loss(logits).item() == pytest.approx(want, abs=1e-6)
    # minimising it spreads the distribution: the gradient lowers the largest logit
    x = logits[1:2].clone().requires_grad_(True)
    entropy_loss(x).backward()
    assert x.grad[0, 0] > 0 and x.grad[0, 1] < 0


def test_tamper_weights_follow_the_reference_schedule() -> None:
    # training.py: grad_scale * exp(λ (i - (K - 1))) / num_tasks where (i + 1) % subsample == 0
    w = tamper_weights(64, 4, 4.0, "schedule", 0.0625)
    assert sorted(w) == list(range(3, 64, 4))
    assert w[63] == pytest.approx(4.0)
    assert w[3] == pytest.approx(4.0 * math.exp(-0.0625 * 60))
    uniform = tamper_weights(8, 2, 4.0, "uniform", 0.0625, tasks=2)
    assert uniform == {i: pytest.approx(4.0 / 8 / 2) for i in (1, 3, 5, 7)}
    assert list(tamper_weights(2, 4, 4.0, "schedule", 0.0625)) == [1]  # tr_every > K: last


def hand_tar(model, batch, adversary, heldout, lr, tamper_weight=4.0, lam=0.0625):
    """TAR's outer gradient, every piece recomputed from the full model's logits."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.01)
    k = len(adversary)
    tamper = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, adv in enumerate(adversary):
        grads = autograd_of(model, supervised_loss(model, adv))
        for n, p in params.items():
            p.grad = grads[n]
        optimizer.step()
        for p in params.values():
            p.grad = None
        logits = model(input_ids=heldout.input_ids, attention_mask=heldout.attention_mask).logits
        answer = logits[:, :-1][heldout.labels[:, 1:] != IGNORE_INDEX]
        probs = answer.softmax(-1)
        entropy = -(probs * probs.log()).sum(-1).mean()
        weight = tamper_weight * math.exp(lam * (i - (k - 1)))
        for n, g in autograd_of(model, -entropy).items():
            tamper[n] += weight * g
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX)
    with torch.no_grad(), model.disable_adapter():
        frozen = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states
    mask = batch.attention_mask.float()
    distance = torch.stack([((h - f).norm(dim=-1) * mask).sum() / mask.sum()
                            for h, f in zip(out.hidden_states, frozen)]).mean()
    retain = autograd_of(model, ce + distance)
    return {n: tamper[n] + retain[n] for n in params}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_tar_gradient_matches_hand_computation(tiny_lora, grad_accum) -> None:
    defense = tar(inner_steps=2, tr_every=1, adversary_lrs=[1e-2])
    trainer = make_trainer(tiny_lora, defense, grad_accum=grad_accum)
    defense.setup("alignment", trainer)
    batch = token_batch(4, seed=1)
    adversary = [token_batch(4, seed=2), token_batch(4, seed=3)]
    heldout = token_batch(5, seed=4)
    defense.adversary, defense.heldout = Cycle(*adversary), Cycle(heldout)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch)
    assert stats["attack_shift"] > 0 and stats["representation_distance"] > 0
    expected = hand_tar(tiny_lora, batch, adversary, heldout, lr=1e-2)
    assert set(got) == set(expected)
    for name, value in expected.items():
        want = earlier[name] + value / grad_accum
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


def test_inner_loop_leaves_outer_weights_and_optimizer_untouched(tiny_lora) -> None:
    defense = tar(inner_steps=3, tr_every=1, adversary_lrs=[5e-2])
    trainer = make_trainer(tiny_lora, defense)
    params = trainer.trainable_parameters()
    trainer.optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # give the outer optimizer some state
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    state = {id(p): {k: v.clone() for k, v in s.items()}
             for p, s in trainer.optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in trainer.optimizer.param_groups]
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    defense.setup("alignment", trainer)

    seen = []  # weights as the adversary's batches are drawn: they do move inside the loop
    stream = defense.adversary

    class Watch:
        def next(self):
            seen.append(torch.cat([p.detach().flatten().clone() for p in params]))
            return stream.next()

    defense.adversary = Watch()
    stats = defense.training_step("alignment", trainer, token_batch(4, seed=1))

    for n, p in tiny_lora.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed before the outer step"
        assert (p.grad is not None) == p.requires_grad
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    assert len(seen) == 3 and not torch.equal(seen[0], seen[-1])
    assert stats["attack_shift"] > 0
    assert len(trainer.optimizer.state) == len(state)
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), "the trainer's optimizer state changed"
    assert [{k: v for k, v in g.items() if k != "params"}
            for g in trainer.optimizer.param_groups] == groups


def test_full_finetuning_keeps_a_frozen_copy(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = attach_trainable(model, TrainConfig(method="full"))
    defense = tar(inner_steps=2, tr_every=1, adversary_lrs=[1e-2])
    trainer = make_trainer(model, defense)
    defense.setup("alignment", trainer)
    assert defense.frozen is not None and defense.frozen is not model
    assert not any(p.requires_grad for p in defense.frozen.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = defense.training_step("alignment", trainer, token_batch(4, seed=1))
    assert stats["representation_distance"] == 0.0  # still at the frozen weights
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    lora = attach_trainable(model, TrainConfig(lora=LoraConfig(r=2, alpha=4)))
    trainer = make_trainer(lora, defense)
    defense.setup("alignment", trainer)
    assert defense.frozen is None  # LoRA: the adapters are switched off instead


def test_tar_defaults_and_validation() -> None:
    o = tar().options
    # run_tar_bio.sh / tar.py: --tar_inner_loop_steps 64, --adversary_lr_samples 2e-6,2e-5,4e-5,
    # --tar_inner_loop_subsample 4, --tar_tamper_resistance_loss_type max_entropy,
    # --tar_tamper_resistance_grad_scale 4.0, --use_weighting_schedule --schedule_lambda 0.0625,
    # --tar_retain_scale 1.0, --retain_representations, --tar_num_tasks_sampled 1,
    # --tar_adversary_batch_size 4; dataloaders.py holds out 20 % (test_size=0.20) for x_tr
    assert (o.inner_steps, o.adversary_lrs, o.tr_every, o.tr_loss) == (
        64, [2e-6, 2e-5, 4e-5], 4, "entropy")
    assert (o.tamper_weight, o.weighting, o.schedule_lambda) == (4.0, "schedule", 0.0625)
    assert (o.retain_weight, o.representation_weight, o.tasks_per_step) == (1.0, 1.0, 1)
    assert (o.adversary_batch_size, o.tr_batch_size, o.heldout_fraction) == (4, None, 0.2)
    assert DEFENSES.get("tar").needs_provider_harmful
    assert DEFENSES.get("tar").stages == ("alignment",)
    preset = tar(**CPU_PRESET).options
    assert (preset.inner_steps, preset.tr_every) == (4, 2)
    with pytest.raises(ConfigError, match="inner_step"):
        tar(inner_step=3)  # unknown option
    with pytest.raises(ConfigError, match="same prompt"):
        tar(tr_loss="dpo")
    with pytest.raises(ConfigError, match="tr_loss.*entropy"):
        tar(tr_loss="max_logit")
    with pytest.raises(ConfigError, match="weighting"):
        tar(weighting="linear")
    for bad in ({"inner_steps": 0}, {"tr_every": 0}, {"adversary_lrs": []},
                {"adversary_lrs": [1e-5, -1.0]}, {"heldout_fraction": 1.0},
                {"tamper_weight": -1.0}, {"tr_batch_size": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            tar(**bad)


def test_tar_holds_out_harmful_rows_for_the_tamper_loss(tiny_lora) -> None:
    defense = tar()
    trainer = make_trainer(tiny_lora, defense)  # 12 harmful rows
    defense.setup("alignment", trainer)
    held, adv = defense.heldout.items, defense.adversary.items
    assert (len(held), len(adv)) == (2, 10)  # round(0.2 · 12)
    assert not {id(x) for x in held} & {id(x) for x in adv}
    assert defense.heldout.batch_size == trainer.cfg.batch_size
    assert defense.adversary.batch_size == 4


def test_tar_runs_the_pipeline(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline

    config = load_config(None, [*tiny_overrides, "defense=tar",
                                "defense_args={inner_steps: 2}",
                                "provider_harmful={kind: demo_harmful_qa, n: 16}",
                                "alignment.train.max_steps=2", "finetune.train.max_steps=2"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    align = json.loads((tmp_path / "run" / "align" / "stage.json").read_text())
    report = align["defense_report"]
    assert align["defense"]["options"]["inner_steps"] == 2
    assert math.isfinite(report["harmful_loss_after_attack_last"])
    assert report["attack_shift_first"] > 0
