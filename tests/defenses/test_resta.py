"""RESTA returns the fine-tuned model plus exactly γ·(W_aligned − W_base): checked against the
merged fine-tuned weights and the aligned and base weights of the tiny model, computed
separately; DARE keeps a Bernoulli(1 − p) fraction of entries, rescaled by 1/(1 − p)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import run_tiny_pipeline

from hftlab.config import ConfigError, LoraConfig, TrainConfig
from hftlab.defenses import DEFENSES
from hftlab.defenses.resta import dare
from hftlab.model import attach_trainable, is_peft

ALIGN_TARGETS = ["q_proj", "v_proj", "down_proj"]  # the fine-tuning adapter covers all seven


def randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def load_tiny(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def setup(tiny_model_dir: Path, tmp_path: Path):
    """(fine-tuned PEFT model, fake ctx, base weights, aligned weights): an alignment adapter on
    three module kinds saved where ``alignment_vectors`` reads it, merged into the base, and a
    fresh fine-tuning adapter on all seven linear kinds on top."""
    base_weights = weights_of(load_tiny(tiny_model_dir))
    torch.manual_seed(1)
    align_cfg = TrainConfig(lora=LoraConfig(r=4, alpha=8, target_modules=ALIGN_TARGETS))
    aligning = attach_trainable(load_tiny(tiny_model_dir), align_cfg)
    randomize_lora_b(aligning, seed=2)
    aligning.save_pretrained(tmp_path / "align_cache" / "model")
    aligned = aligning.merge_and_unload()
    aligned_weights = weights_of(aligned)
    torch.manual_seed(3)
    tuned = attach_trainable(aligned, TrainConfig(lora=LoraConfig(r=4, alpha=8)))
    randomize_lora_b(tuned, seed=4)
    ctx = SimpleNamespace(
        stage_info=lambda stage: {"cache": str(tmp_path / "align_cache")},
        device=torch.device("cpu"),
        config=SimpleNamespace(seed=7),
    )
    return tuned, ctx, base_weights, aligned_weights


def safety_vector(name: str, base: dict, aligned: dict) -> torch.Tensor | None:
    """W_aligned − W_base of a targeted linear weight (None elsewhere)."""
    kind = name.split(".")[-2]
    return aligned[name] - base[name] if kind in ALIGN_TARGETS and name.endswith(
        "proj.weight") else None


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_resta_adds_exactly_gamma_times_safety_vector(setup, gamma) -> None:
    tuned, ctx, base, aligned = setup
    merged_ft = weights_of(copy.deepcopy(tuned).merge_and_unload())
    defense = DEFENSES.get("resta")(gamma=gamma)
    out = defense.post_finetune(tuned, ctx)
    assert not is_peft(out)
    got = weights_of(out)
    assert got.keys() == merged_ft.keys()
    changed_by_v = 0
    for name, value in got.items():
        v = safety_vector(name, base, aligned)
        expected = merged_ft[name] if v is None else merged_ft[name] + gamma * v
        changed_by_v += v is not None
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert changed_by_v == 6  # 3 kinds × 2 blocks
    report = defense.report("post_finetune")
    assert report["gamma"] == gamma and report["dare_rate"] == 0.0
    assert report["dare_kept_fraction"] is None
    assert report["modules_changed"] == 14 and report["safety_vector_modules"] == 6
    assert report["finetuning"] == "lora" and report["returned"] == "merged model"
    hand_norm = math.sqrt(sum(float((gamma * v).pow(2).sum()) for n in got
                              if (v := safety_vector(n, base, aligned)) is not None))
    assert report["gamma_v_norm"] == pytest.approx(hand_norm, rel=1e-5)


def test_resta_under_full_finetuning_adds_gamma_v_to_the_weights(setup) -> None:
    tuned, ctx, base, aligned = setup
    plain = copy.deepcopy(tuned).merge_and_unload()  # stands in for a fully fine-tuned model
    before = weights_of(plain)
    out = DEFENSES.get("resta")(gamma=0.3).post_finetune(plain, ctx)
    assert out is plain
    for name, value in weights_of(out).items():
        v = safety_vector(name, base, aligned)
        expected = before[name] if v is None else before[name] + 0.3 * v
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_dare_keeps_the_expected_fraction_and_rescales() -> None:
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    rate = 0.3
    out, kept = dare(delta, rate, torch.Generator().manual_seed(5))
    keep = out != 0
    assert kept == int(keep.sum())
    assert kept / delta.numel() == pytest.approx(1 - rate, abs=0.01)  # 5σ of Bernoulli(0.7)
    torch.testing.assert_close(out[keep], delta[keep] / (1 - rate))
    # same seed, same mask; another seed, another mask
    again, _ = dare(delta, rate, torch.Generator().manual_seed(5))
    other, _ = dare(delta, rate, torch.Generator().manual_seed(6))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # the mask is a Bernoulli(1 − p) draw: uniform ≥ p from the same generator
    uniform = torch.rand(delta.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(keep, uniform >= rate)
    # mean preserved in expectation: E[DARE(δ)] = δ
    ones = torch.ones(100_000)
    assert float(dare(ones, 0.9, torch.Generator().manual_seed(1))[0].mean()) == pytest.approx(
        1.0, abs=0.1)
    same, n = dare(delta, 0.0, torch.Generator().manual_seed(5))
    assert same is delta and n == delta.numel()


@pytest.mark.parametrize(("dare_on", "finetuning"), [("finetune", "lora"),
                                                     ("safety_vector", "lora"),
                                                     ("finetune", "full")])
def test_resta_dare_drops_and_rescales_one_delta(setup, dare_on, finetuning, tiny_model_dir,
                                                 monkeypatch) -> None:
    tuned, ctx, base, aligned = setup
    rate, gamma = 0.5, 0.8
    dense_ft = {n: w for n, w in weights_of(copy.deepcopy(tuned).merge_and_unload()).items()}
    if finetuning == "full":  # a plain model; δ = W_ft − W_aligned of the model it came from
        aligned_model = load_tiny(tiny_model_dir)
        aligned_model.load_state_dict(aligned, strict=False)
        monkeypatch.setattr("hftlab.stage_models.aligned_model", lambda run_ctx: aligned_model)
        model = copy.deepcopy(tuned).merge_and_unload()
    else:
        model = copy.deepcopy(tuned)
    defense = DEFENSES.get("resta")(gamma=gamma, dare_rate=rate, dare_on=dare_on)
    out = weights_of(defense.post_finetune(model, ctx))
    kept = total = 0
    for name, value in out.items():
        v = safety_vector(name, base, aligned)
        sv = torch.zeros_like(value) if v is None else gamma * v
        ft = dense_ft[name] - aligned[name]  # the user's merged delta δ
        if not name.endswith("proj.weight"):
            torch.testing.assert_close(value, dense_ft[name])
            continue
        sparse, dense = (ft, sv) if dare_on == "finetune" else (sv, ft)
        # what is left after removing the untouched part is, entrywise, 0 or sparse/(1 − p)
        rest = value - aligned[name] - dense
        hit = rest.abs() > 1e-7
        torch.testing.assert_close(rest[hit], sparse[hit] / (1 - rate), atol=1e-6, rtol=1e-4)
        assert float(rest[~hit].abs().max()) < 1e-6
        if dare_on == "finetune" or v is not None:
            kept, total = kept + int(hit.sum()), total + hit.numel()
    assert kept / total == pytest.approx(1 - rate, abs=0.05)
    report = defense.report("post_finetune")
    assert report["dare_on"] == dare_on
    assert report["dare_kept_fraction"] == pytest.approx(kept / total, abs=1e-3)
    # the run's seed fixes the masks
    assert report["finetuning"] == finetuning
    if finetuning == "lora":
        again = weights_of(DEFENSES.get("resta")(gamma=gamma, dare_rate=rate, dare_on=dare_on)
                           .post_finetune(copy.deepcopy(tuned), ctx))
        assert all(torch.equal(out[n], again[n]) for n in out)


def test_resta_defaults_and_validation() -> None:
    resta = DEFENSES.get("resta")()
    # declare-lab/resta README ("perform the operation Mf + b*v") and merge/add_safety.py as
    # invoked with --weight1 1.0 --weight2 1.0 --weight3 -1.0: b = 1; DARE is optional (off).
    assert resta.options.gamma == 1.0
    assert resta.options.dare_rate == 0.0
    assert resta.options.dare_on == "finetune"
    assert resta.stages == ("post_finetune",)
    assert resta.cache_key("alignment") is None and not resta.needs_provider_harmful
    for bad in ({"gamma": -0.5}, {"gamma": float("nan")}, {"dare_rate": 1.0},
                {"dare_rate": -0.1}, {"dare_on": "everything"}, {"beta": 1.0}):
        with pytest.raises(ConfigError):
            DEFENSES.get("resta")(**bad)


def test_resta_needs_the_aligned_checkpoint(tiny_lora) -> None:
    ctx = SimpleNamespace(stage_info=lambda stage: {"cache": None}, device="cpu",
                          config=SimpleNamespace(seed=0))
    with pytest.raises(ConfigError, match="alignment.enabled"):
        DEFENSES.get("resta")().post_finetune(tiny_lora, ctx)


def test_resta_end_to_end(tiny_overrides, tmp_path) -> None:
    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, "defense=resta",
                                "defense_args={gamma: 0.5, dare_rate: 0.2}")
    repair = metrics["repair"]
    assert repair is not None
    assert math.isfinite(repair["harmful_score_change"])
    assert math.isfinite(repair["finetune_accuracy_change"])
    report = repair["report"]
    assert report["gamma"] == 0.5 and report["dare_rate"] == 0.2
    assert report["modules_changed"] == 14  # 7 LoRA targets × 2 blocks
    assert math.isfinite(report["gamma_v_norm"]) and report["gamma_v_norm"] > 0
    assert report["dare_kept_fraction"] == pytest.approx(0.8, abs=0.1)
