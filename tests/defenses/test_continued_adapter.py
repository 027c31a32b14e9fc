"""Defenses whose fine-tuning keeps training the alignment LoRA (Panacea's ``single_lora``, EWC's
``space: alignment_adapter``, both the reference's default): the fine-tuning stage trains and
saves that adapter, Panacea's ε perturbs its factors and the served model is base + adapter + ε
(checked against a hand-merged model), the fresh-adapter options keep the old behaviour, a
fine-tuning LoRA that differs from the alignment's is refused, and EWC's Fisher and penalty are
over the continued adapter's factors (checked by autograd)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import (
    PAD_ID,
    assert_grads_close,
    autograd_of,
    lora_model,
    make_trainer,
    run_tiny_pipeline,
    stage_info,
    step_keeping_earlier_grads,
    token_batch,
    token_items,
)

import hftlab.defenses.panacea as panacea_module
from hftlab.config import ConfigError, load_config
from hftlab.context import RunContext, check_continued_adapter
from hftlab.defenses import DEFENSES
from hftlab.stage_models import aligned_adapter_model, deployed_model
from hftlab.train import collate, supervised_loss
from hftlab.utils import read_json

HARMFUL_ROWS = "provider_harmful={kind: demo_harmful_qa, n: 16}"
# not the default LoRA, so a stage that ignored it would show (r 4, α 8: scale 2)
LORA = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
FRESH_LORA = "{r: 2, alpha: 2, target_modules: [k_proj, v_proj]}"
FRESH = {"panacea": {"single_lora": False}, "ewc": {"space": "weights"}}


def lora_overrides(finetune_lora: str = LORA) -> list[str]:
    return [f"alignment.train.lora={LORA}", f"finetune.train.lora={finetune_lora}"]


def adapter_files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return (read_json(folder / "adapter_config.json"),
            load_file(str(folder / "adapter_model.safetensors")))


def hand_merged(model_dir: Path, adapters: list[tuple[dict[str, torch.Tensor], float]]):
    """The base model with W += s·B·A written in by hand for each saved adapter (its keys
    ``base_model.model.<module>.lora_A.weight``): no PEFT involved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for weights, scale in adapters:
            for key, a in weights.items():
                if ".lora_A." not in key:
                    continue
                path = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                modules[path].weight.add_(scale * (b.double() @ a.double()).float())
    return model


def plus_epsilon(weights: dict[str, torch.Tensor], eps: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The saved adapter with ε (named as in the live model, ``.default.``) added."""
    return {k: v + eps[k.replace(".weight", ".default.weight")] for k, v in weights.items()}


def assert_same_logits(model, hand) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 7, 23, 61]])
    with torch.no_grad():
        got, want = model(ids).logits, hand(ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)
    assert float(got[0, -1, 3]) == pytest.approx(float(want[0, -1, 3]), abs=2e-5)


def test_panacea_single_lora_fine_tunes_the_alignment_adapter(
    tiny_overrides, tiny_model_dir, tmp_path
) -> None:
    overrides = ["defense=panacea", HARMFUL_ROWS, *lora_overrides()]
    run_tiny_pipeline(tiny_overrides, tmp_path, *overrides)
    run = tmp_path / "run"
    assert stage_info(tmp_path)["continues_alignment_adapter"] is True
    aligned_config, aligned = adapter_files(Path(stage_info(tmp_path, "align")["cache"]) / "model")
    tuned_config, tuned = adapter_files(run / "finetune" / "model")
    # the fine-tuning stage saved the alignment adapter itself (r, α, targets), trained on
    for config in (aligned_config, tuned_config):
        assert (config["r"], config["lora_alpha"]) == (4, 8)
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert tuned.keys() == aligned.keys()
    assert all(not torch.equal(tuned[k], aligned[k]) for k in tuned)
    # ε is over that adapter's factors, and only them
    eps, _ = panacea_module.load_epsilon(run / "finetune" / panacea_module.EPSILON_FILE)
    assert {n.replace(".default.", ".") for n in eps} == tuned.keys()
    assert all(".lora_A." in n or ".lora_B." in n for n in eps)
    # served: base + (alignment adapter, fine-tuned) + ε, nothing merged twice
    _, served = adapter_files(run / "post_finetune" / "model")
    with_eps = plus_epsilon(tuned, eps)
    assert all(torch.equal(served[k], with_eps[k]) for k in served)
    config = load_config(None, [*tiny_overrides, *overrides])
    hand = hand_merged(tiny_model_dir, [(with_eps, 2.0)])
    assert_same_logits(deployed_model(RunContext(config, run)), hand)


def test_panacea_without_single_lora_trains_a_fresh_adapter(
    tiny_overrides, tiny_model_dir, tmp_path
) -> None:
    overrides = ["defense=panacea", HARMFUL_ROWS, "defense_args={single_lora: false}",
                 *lora_overrides(FRESH_LORA)]
    run_tiny_pipeline(tiny_overrides, tmp_path, *overrides)
    run = tmp_path / "run"
    assert "continues_alignment_adapter" not in stage_info(tmp_path)
    _, aligned = adapter_files(Path(stage_info(tmp_path, "align")["cache"]) / "model")
    tuned_config, tuned = adapter_files(run / "finetune" / "model")
    assert (tuned_config["r"], tuned_config["lora_alpha"]) == (2, 2)  # finetune.train.lora
    assert sorted(tuned_config["target_modules"]) == ["k_proj", "v_proj"]
    eps, _ = panacea_module.load_epsilon(run / "finetune" / panacea_module.EPSILON_FILE)
    assert {n.replace(".default.", ".") for n in eps} == tuned.keys()
    # served: the merged aligned model + (fresh adapter + ε)
    config = load_config(None, [*tiny_overrides, *overrides])
    hand = hand_merged(tiny_model_dir, [(aligned, 2.0), (plus_epsilon(tuned, eps), 1.0)])
    assert_same_logits(deployed_model(RunContext(config, run)), hand)


@pytest.mark.parametrize("name", ["panacea", "ewc"])
def test_continued_adapter_needs_the_alignment_lora(name, tiny_overrides, tmp_path) -> None:
    differs = load_config(None, [*tiny_overrides, f"defense={name}", HARMFUL_ROWS,
                                 *lora_overrides(FRESH_LORA)])
    defense = DEFENSES.get(name)()
    assert defense.continues_alignment_adapter()
    with pytest.raises(ConfigError, match="finetune.train.lora"):
        check_continued_adapter(defense, differs)
    with pytest.raises(ConfigError, match="finetune.train.lora"):
        RunContext(differs, tmp_path / "run")  # the run refuses to start
    fresh = DEFENSES.get(name)(**FRESH[name])
    assert not fresh.continues_alignment_adapter()
    check_continued_adapter(fresh, differs)  # a fresh adapter may differ
    check_continued_adapter(defense, load_config(None, [*tiny_overrides, *lora_overrides()]))
    for bad in ("alignment.enabled=false", "finetune.train.method=full"):
        config = load_config(None, [*tiny_overrides, bad])
        with pytest.raises(ConfigError, match="method: lora"):
            check_continued_adapter(defense, config)


ALIGNMENT_ITEMS = token_items(7, seed=5)


def continued_adapter(model_dir: Path, folder: Path) -> tuple[torch.nn.Module, dict]:
    """A trained-looking alignment adapter (non-zero A and B) saved where the alignment cache
    keeps it, loaded back as the pipeline's fine-tuning stage loads it; and its saved values."""
    from transformers import AutoModelForCausalLM

    aligned = lora_model(model_dir)
    aligned.save_pretrained(folder / "model")
    saved = {n: p.detach().clone() for n, p in aligned.named_parameters() if "lora_" in n}
    ctx = SimpleNamespace(
        stage_info=lambda stage: {"cache": str(folder)},
        base_model=lambda precision=None: AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32),
    )
    return aligned_adapter_model(ctx), saved


def test_ewc_fisher_and_penalty_are_over_the_continued_adapter(tiny_model_dir, tmp_path) -> None:
    model, saved = continued_adapter(tiny_model_dir, tmp_path / "align")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params.keys() == saved.keys()  # the alignment adapter's lora_A / lora_B, trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in params)
    lamb = 300.0
    defense = DEFENSES.get("ewc")(lamb=lamb, fisher_batch_size=3)  # space alignment_adapter
    trainer = make_trainer(model, defense, stage="finetune", grad_accum=2,
                           alignment_items=ALIGNMENT_ITEMS)
    defense.setup("finetune", trainer)
    # F = Σ_batches (∇ CE(batch))² over the adapter's factors, at the aligned values
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(ALIGNMENT_ITEMS), 3):
        batch = collate(ALIGNMENT_ITEMS[start : start + 3], PAD_ID)
        for n, g in autograd_of(model, supervised_loss(model, batch)).items():
            fisher[n] += g**2
    assert len(defense.fisher) == len(params)
    for (name, want), got in zip(fisher.items(), defense.fisher):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-4), name
        assert want.abs().sum() > 0, name  # A too: the adapter's B is not zero
    for (name, start), value in zip(saved.items(), defense.start):
        assert torch.equal(value, start), name  # w_init: the alignment adapter
    assert defense.fisher_info["space"] == "alignment_adapter"
    assert defense.fisher_info["fisher_batches"] == 3
    # the penalty λ·Σ F (w − w_init)² and its gradient, by autograd at moved weights
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    batch = token_batch(4, seed=1)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, model, batch,
                                                     stage="finetune")
    penalty = lamb * sum((fisher[n] * (p - saved[n]) ** 2).sum() for n, p in params.items())
    assert stats["ewc_penalty"] == pytest.approx(float(penalty.detach()), rel=1e-4)
    grad_penalty = autograd_of(model, penalty)
    assert max(float(g.abs().max()) for g in grad_penalty.values()) > 1e-3  # it matters
    grad_ce = autograd_of(model, supervised_loss(model, batch))
    assert_grads_close(got, {n: grad_ce[n] + grad_penalty[n] for n in params}, earlier,
                       grad_accum=2)


def test_ewc_pipeline_continues_the_alignment_adapter(tiny_overrides, tmp_path) -> None:
    run_tiny_pipeline(tiny_overrides, tmp_path, "defense=ewc", *lora_overrides(),
                      "defense_args={fisher_rows: 8, lamb: 1000.0}", "finetune.train.max_steps=3")
    info = stage_info(tmp_path)
    assert info["continues_alignment_adapter"] is True
    report = info["defense_report"]
    assert (report["space"], report["fisher_rows"], report["fisher_batches"]) == (
        "alignment_adapter", 8, 2)  # fisher_batch_size 5
    assert report["fisher_sum"] > 0
    assert report["ewc_penalty_first"] == 0.0  # w starts at the alignment adapter
    assert math.isfinite(report["ewc_penalty_last"]) and report["ewc_penalty_last"] > 0
    _, aligned = adapter_files(Path(stage_info(tmp_path, "align")["cache"]) / "model")
    _, tuned = adapter_files(tmp_path / "run" / "finetune" / "model")
    assert tuned.keys() == aligned.keys()
    assert any(not torch.equal(tuned[k], aligned[k]) for k in tuned)
