"""The optimised updates of the fine-tuning-stage defenses equal the straightforward computation
they replaced (written out here), to 1e-6 relative: KL's fused CE + KL gradient, LDIFS's masked
feature penalty, EWC's and Lisa's vectorised penalties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import (
    Cycle,
    make_trainer,
    param_grads,
    token_batch,
    token_items,
)

from hftlab.defenses import DEFENSES
from hftlab.defenses.common import mlp_modules, record_outputs
from hftlab.defenses.kl import kl_batchmean, kl_positions, logits_at, predicting_supervised
from hftlab.model import causal_lm_parts
from hftlab.train import IGNORE_INDEX

REL = 1e-6


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    """‖got − want‖ ≤ rel · ‖want‖ (a whole tensor, so tiny entries do not dominate)."""
    err = (got.double() - want.double()).norm()
    assert err <= rel * want.double().norm() + 1e-30, (float(err), float(want.norm()))


def step_grads(defense, trainer, model, batch) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    stats = defense.training_step("finetune", trainer, batch)
    grads = param_grads(model)
    model.zero_grad(set_to_none=True)
    return stats, grads


def reference_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name])


@pytest.mark.parametrize("positions", ["all", "supervised"])
def test_kl_fused_gradient_equals_separate_ce_and_kl(tiny_lora, positions) -> None:
    lamb = 0.7
    defense = DEFENSES.get("kl")(lamb=lamb, positions=positions)
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    batch = token_batch(4, seed=1)
    stats, got = step_grads(defense, trainer, tiny_lora, batch)
    # the computation before the fused path: row subsets of the logits, two log_softmax
    select = kl_positions(batch, positions)
    supervised = predicting_supervised(batch)
    both = select | supervised
    with torch.no_grad(), tiny_lora.disable_adapter():
        aligned = logits_at(tiny_lora, batch, select)
    logits = logits_at(tiny_lora, batch, both)
    targets = torch.full_like(batch.labels, IGNORE_INDEX)
    targets[:, :-1] = batch.labels[:, 1:]
    ce = F.cross_entropy(logits[supervised[both]], targets[supervised])
    kl = kl_batchmean(aligned, logits[select[both]], batch.labels.shape[0])
    assert stats["loss"] == pytest.approx(ce.item(), rel=REL)
    assert stats["kl"] == pytest.approx(kl.item(), rel=REL)
    assert_same_grads(got, reference_grads(tiny_lora, ce + lamb * kl))


def test_ldifs_masked_penalty_equals_indexed_terms(tiny_lora) -> None:
    rho, max_term = 0.3, 1e9
    defense = DEFENSES.get("ldifs")(rho=rho, max_layer_term=max_term)
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    batch = token_batch(4, seed=3)
    assert not batch.attention_mask.all()
    stats, got = step_grads(defense, trainer, tiny_lora, batch)
    modules = mlp_modules(tiny_lora)
    body, _ = causal_lm_parts(tiny_lora)
    with torch.no_grad(), tiny_lora.disable_adapter(), record_outputs(modules) as outs:
        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    aligned = [o.detach() for o in outs]
    with record_outputs(modules) as outs:
        ce = trainer.compute_loss(batch)
    keep = batch.attention_mask.bool()
    terms = [rho / 2 * (f[keep].float() - a[keep].float()).pow(2).sum()
             for f, a in zip(outs, aligned)]
    kept = [t for t in terms if math.isfinite(float(t)) and float(t) < max_term]
    penalty = torch.stack(kept).sum()
    assert stats["layers_kept"] == len(kept)
    assert stats["ldifs_penalty"] == pytest.approx(penalty.item(), rel=REL)
    assert_same_grads(got, reference_grads(tiny_lora, ce + penalty))


@pytest.mark.parametrize("space", ["trainable", "weights"])
def test_ewc_vectorised_penalty_equals_per_parameter_loop(tiny_lora, space) -> None:
    lamb = 3.0
    defense = DEFENSES.get("ewc")(lamb=lamb, space=space, fisher_rows=8, fisher_batch_size=4)
    trainer = make_trainer(tiny_lora, defense, stage="finetune",
                           alignment_items=token_items(8, seed=5))
    defense.setup("finetune", trainer)
    with torch.no_grad():  # move the weights so the penalty is not zero
        for p in trainer.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    value, params, grads = defense.penalty()
    want_value = 0.0
    want_grads = []
    if space == "trainable":
        for p, fisher, start in zip(defense.params, defense.fisher, defense.start):
            weighted = fisher * (p.float() - start)
            want_value += lamb * float((weighted * (p.float() - start)).sum())
            want_grads.append(2 * lamb * weighted)
        assert params == defense.params
    else:
        want_params = []
        for layer, fisher, start in zip(defense.layers, defense.fisher, defense.start_delta):
            delta = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
            if start is not None:
                delta = delta - start
            weighted = fisher * delta
            want_value += lamb * float((weighted * delta).sum())
            factor = 2 * lamb * layer.scaling
            want_params += [layer.lora_B, layer.lora_A]
            want_grads += [factor * weighted @ layer.lora_A.float().T,
                           factor * layer.lora_B.float().T @ weighted]
        assert all(a is b for a, b in zip(params, want_params))
    assert want_value > 0
    assert value == pytest.approx(want_value, rel=REL)
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
        assert_rel_close(g, w)


def test_lisa_vectorised_proximal_equals_per_parameter_loop(tiny_lora) -> None:
    rho = 0.5
    defense = DEFENSES.get("lisa")(alignment_step=0, finetune_step=5, rho=rho,
                                   proximal_after=0.0)
    trainer = make_trainer(tiny_lora, defense, stage="finetune",
                           alignment_items=token_items(8, seed=6))
    defense.setup("finetune", trainer)
    defense.alignment = Cycle(token_batch(4, seed=7))
    params = trainer.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    anchor = [a.clone() for a in defense.anchor]
    for p in params:
        p.grad = torch.randn_like(p)
    earlier = [p.grad.clone() for p in params]
    total = defense.add_proximal_grad(params, 0.25)
    want_total = 0.0
    for p, a, g, e in zip(params, anchor, [p.grad for p in params], earlier):
        diff = p.detach() - a
        want_total += float(diff.float().pow(2).sum())
        assert_rel_close(g, e + 0.25 * diff)
    assert total == pytest.approx(rho / 2 * want_total, rel=REL)
    # the switch's drift: the same sum
    defense.switch(params, "finetune")
    assert defense.switch_drift[-1] == pytest.approx(want_total, rel=REL)
    assert all(torch.equal(a, p.detach()) for a, p in zip(defense.anchor, params))


def test_constrained_sft_report_sums_equal_per_mask_reads(tiny_lora) -> None:
    defense = DEFENSES.get("constrained_sft")(bias_length=2)
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 4])
    weights = torch.tensor([0.5, 1e-3, 1.2, 0.9, 1e-4, 1.7, 0.3])
    shift = torch.tensor([0.1, -2.0, 0.3, 0.0, 4.0, -0.5, 0.25])
    defense._record(positions, shift, weights)
    defense._record(positions, shift * 2, weights)
    want = dict.fromkeys(defense._sums, 0.0)
    for factor in (1, 2):
        prefix = positions < 2
        for name, mask in (("prefix", prefix), ("rest", ~prefix)):
            want[f"n_{name}"] += float(mask.sum())
            want[f"w_{name}"] += float(weights[mask].sum())
            want[f"shift_{name}"] += float((shift * factor)[mask].sum())
        want["clamped"] += float((weights <= 1e-3).sum())
    assert defense._sums == want
