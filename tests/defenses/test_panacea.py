"""Panacea against hand computations: the applied gradient is ∇f(w) − λ(∇min(h(w+ε), max) −
∇h(w)) with ε = ρ·∇h(w)/‖∇h(w)‖ (autograd, separately); ε is recomputed each step; the ε saved
at the last fine-tuning step is exactly what post_finetune adds, also in a resumed run."""

from __future__ import annotations

import dataclasses
import math
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import (
    Cycle,
    autograd_of,
    make_trainer,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
    token_items,
)

import hftlab.defenses.panacea as panacea_module
from hftlab.config import ConfigError, TrainConfig
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES
from hftlab.train import supervised_loss

HARMFUL_ROWS = "provider_harmful={kind: demo_harmful_qa, n: 16}"


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def hand_epsilon(model, harmful, rho):
    grad_h = autograd_of(model, supervised_loss(model, harmful))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad_h.values())).float()
    return grad_h, {n: rho * g / (norm + 1e-7) for n, g in grad_h.items()}


def hand_panacea(model, batch, harmful, lamb, rho, clamp):
    """∇f(w) − λ(∇ min(h(w + ε), clamp) − ∇h(w)), each term by autograd; weights restored."""
    grad_f = autograd_of(model, supervised_loss(model, batch))
    grad_h, eps = hand_epsilon(model, harmful, rho)
    params = trainable(model)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n] + eps[n])
    grad_h_eps = autograd_of(model, torch.clamp(supervised_loss(model, harmful), max=clamp))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return {n: grad_f[n] - lamb * (grad_h_eps[n] - grad_h[n]) for n in grad_f}, grad_f, grad_h


# The tiny model's harmful loss is ≈ 6.25: a clamp at 100 keeps ∇h(w + ε), the reference's 5
# zeroes it (the gradient is then ∇f + λ∇h).
@pytest.mark.parametrize(("grad_accum", "clamp"), [(1, 100.0), (2, 100.0), (1, 5.0)])
def test_panacea_gradient_matches_hand_computation(tiny_lora, grad_accum, clamp) -> None:
    lamb, rho = 0.5, 0.5  # large enough that the harmful term shows against ∇f
    defense = DEFENSES.get("panacea")(lamb=lamb, rho=rho, harmful_loss_max=clamp)
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=grad_accum)
    defense.setup("finetune", trainer)
    batch, harmful = token_batch(4, seed=1), token_batch(10, seed=2)
    defense.harmful = Cycle(harmful)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch,
                                                     stage="finetune")
    expected, grad_f, grad_h = hand_panacea(tiny_lora, batch, harmful, lamb, rho, clamp)
    with torch.no_grad():
        plain_f = float(supervised_loss(tiny_lora, batch))
    assert stats["loss"] == pytest.approx(plain_f, rel=1e-5)
    assert stats["harmful_loss_perturbed"] > stats["harmful_loss"]  # ε ascends h
    assert stats["epsilon_norm"] == pytest.approx(rho, rel=1e-5)
    for name, value in expected.items():
        want = earlier[name] + value / grad_accum
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-4), name
    # the harmful term is material (the check above is not just ∇f)
    shift = max(float((expected[n] - grad_f[n]).abs().max()) for n in expected)
    assert shift > 1e-3
    if clamp == 5.0:  # h(w + ε) > 5: its gradient is cut, leaving ∇f + λ∇h
        for name in expected:
            assert torch.allclose(expected[name], grad_f[name] + lamb * grad_h[name], atol=1e-7)


def test_ascent_perturbation_has_norm_rho_over_all_tensors() -> None:
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    eps = panacea_module.ascent_perturbation(grads, rho=2.0)
    assert torch.allclose(eps[0], torch.tensor([[1.2, 0.0]]), atol=1e-6)  # 2·3/5
    assert torch.allclose(eps[1], torch.tensor([[0.0, 1.6]]), atol=1e-6)  # 2·4/5


def test_epsilon_is_recomputed_from_each_steps_harmful_gradient(tiny_lora) -> None:
    """Reference ``step_eps``: ε ← ρ·∇h(w)/(‖∇h(w)‖ + 1e-7) from scratch every step (the
    previous ε is replaced, not accumulated)."""
    defense = DEFENSES.get("panacea")(rho=0.3)
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    first, second = token_batch(10, seed=2), token_batch(10, seed=3)
    defense.harmful = Cycle(first, second)
    batch = token_batch(4, seed=1)
    defense.training_step("finetune", trainer, batch)
    _, eps_first = hand_epsilon(tiny_lora, first, 0.3)
    assert defense.epsilon.keys() == eps_first.keys() == trainable(tiny_lora).keys()
    for name, value in eps_first.items():
        assert torch.allclose(defense.epsilon[name], value, atol=1e-7, rtol=1e-5), name
    tiny_lora.zero_grad(set_to_none=True)
    defense.training_step("finetune", trainer, batch)
    _, eps_second = hand_epsilon(tiny_lora, second, 0.3)
    for name, value in eps_second.items():
        assert torch.allclose(defense.epsilon[name], value, atol=1e-7, rtol=1e-5), name
    assert len(defense.trace) == 2
    report = defense.report("finetune")
    assert report["epsilon_norm_first"] == pytest.approx(0.3, rel=1e-4)
    assert {"harmful_loss_first", "harmful_loss_last", "harmful_loss_perturbed_last"} <= set(
        report)


def fake_post_ctx(folder, harmful_items):
    return SimpleNamespace(
        stage_dir=lambda stage: folder / stage,
        data=SimpleNamespace(provider_harmful=[Example("p", "r", True)] * len(harmful_items)),
        tokenize=lambda examples, max_length: harmful_items,
        tokenizer=SimpleNamespace(pad_token_id=0),
        device=torch.device("cpu"),
        autocast=nullcontext,
        config=SimpleNamespace(finetune=SimpleNamespace(train=TrainConfig())),
    )


def test_saved_epsilon_is_exactly_what_post_finetune_adds(tiny_lora, tmp_path,
                                                          monkeypatch) -> None:
    defense = DEFENSES.get("panacea")()
    trainer = make_trainer(tiny_lora, defense, stage="finetune", grad_accum=2, max_steps=2)
    trainer.run = dataclasses.replace(trainer.run, folder=tmp_path / "finetune")
    writes = []
    real_save = panacea_module.save_epsilon

    def spy(path, epsilon, summary):
        writes.append(trainer.step)
        real_save(path, epsilon, summary)

    monkeypatch.setattr(panacea_module, "save_epsilon", spy)
    trainer.train(token_items(16, seed=5))
    assert writes == [1, 1]  # both micro-batches of the last optimizer step (step index 1)
    path = tmp_path / "finetune" / panacea_module.EPSILON_FILE
    saved, summary = panacea_module.load_epsilon(path)
    assert saved.keys() == defense.epsilon.keys()
    assert all(torch.equal(saved[n], defense.epsilon[n]) for n in saved)  # the last ε
    assert summary == defense.report("finetune") and "epsilon_norm_last" in summary

    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    harmful = token_items(6, seed=9)
    ctx = fake_post_ctx(tmp_path, harmful)
    resumed = DEFENSES.get("panacea")()  # a new process: nothing in memory, ε from the file
    out = resumed.post_finetune(model, ctx)
    assert out is model
    for name, p in model.named_parameters():
        want = before[name] + defense.epsilon[name] if name in saved else before[name]
        assert torch.equal(p, want), name
    report = resumed.report("post_finetune")
    assert report["epsilon_norm"] == pytest.approx(1.0, rel=1e-5)  # ρ = 1
    assert report["parameters_perturbed"] == len(saved)
    assert set(report["epsilon_norm_by_layer"]) == {"0", "1"}
    assert report["harmful_loss_after"] > report["harmful_loss_before"]
    assert report["finetune"] == summary

    unchanged = {n: p.detach().clone() for n, p in model.named_parameters()}
    DEFENSES.get("panacea")(add_eps=False).post_finetune(model, ctx)
    assert all(torch.equal(p, unchanged[n]) for n, p in model.named_parameters())
    with pytest.raises(FileNotFoundError, match="finetune stage"):
        DEFENSES.get("panacea")().post_finetune(model, fake_post_ctx(tmp_path / "x", harmful))


def test_panacea_defaults_and_validation() -> None:
    panacea = DEFENSES.get("panacea")()
    # w-yibo/Panacea script/finetune/panacea_gsm8k.sh: lamb=0.001, eps_rho=1;
    # trainer.py: torch.clamp(loss_h, max=5), harmful dataloader batch_size 10; train.py add_eps
    assert (panacea.options.lamb, panacea.options.rho) == (0.001, 1.0)
    assert panacea.options.harmful_loss_max == 5.0
    assert panacea.options.harmful_batch_size == 10
    assert panacea.options.add_eps is True
    # script --alternating single_lora: fine-tuning keeps training the alignment LoRA
    assert panacea.options.single_lora is True and panacea.continues_alignment_adapter()
    assert not DEFENSES.get("panacea")(single_lora=False).continues_alignment_adapter()
    assert DEFENSES.get("panacea").needs_provider_harmful
    assert DEFENSES.get("panacea").stages == ("finetune", "post_finetune")
    assert panacea.cache_key("alignment") is None  # reuses plain sft's aligned checkpoint
    for bad in ({"lamb": -0.1}, {"rho": 0.0}, {"harmful_loss_max": 0.0},
                {"harmful_batch_size": 0}, {"eps_rho": 1.0}, {"rho": "big"}):
        with pytest.raises(ConfigError):
            DEFENSES.get("panacea")(**bad)


def test_panacea_end_to_end_and_resumed_post_finetune(tiny_overrides, tmp_path) -> None:
    from safetensors.torch import load_file

    from hftlab.config import load_config
    from hftlab.pipeline import run_pipeline

    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, "defense=panacea", HARMFUL_ROWS)
    repair = metrics["repair"]
    assert repair is not None
    assert all(math.isfinite(repair[k]) for k in ("before.harmful_score", "harmful_score_change",
                                                  "finetune_accuracy_change"))
    assert repair["report"]["epsilon_norm"] == pytest.approx(1.0, rel=1e-4)
    assert math.isfinite(repair["report"]["harmful_loss_after"])
    finetune_report = stage_info(tmp_path)["defense_report"]
    assert all(math.isfinite(v) for v in finetune_report.values())
    assert repair["report"]["finetune"] == finetune_report

    run = tmp_path / "run"
    eps, _ = panacea_module.load_epsilon(run / "finetune" / panacea_module.EPSILON_FILE)
    tuned = load_file(str(run / "finetune" / "model" / "adapter_model.safetensors"))
    served = load_file(str(run / "post_finetune" / "model" / "adapter_model.safetensors"))
    assert tuned.keys() == served.keys() == {n.replace(".default.", ".") for n in eps}
    for name, e in eps.items():
        key = name.replace(".default.", ".")
        assert torch.equal(served[key], tuned[key] + e), key

    # resume in a new process: post_finetune (and eval) again, ε read back from the file
    for name in ("post_finetune", "eval"):
        shutil.rmtree(run / name)
    config = load_config(None, [*tiny_overrides, "defense=panacea", HARMFUL_ROWS])
    again = run_pipeline(config, run)
    resumed = load_file(str(run / "post_finetune" / "model" / "adapter_model.safetensors"))
    assert all(torch.equal(resumed[k], served[k]) for k in served)
    assert again["repair"]["report"] == repair["report"]
