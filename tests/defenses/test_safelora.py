"""Safe LoRA's projection C = V·Vᵀ/‖V‖_F, its per-layer cosines and its layer selection match
a direct float64 computation on the tiny model, and B ← C·B is applied exactly in the selected
layers and nowhere else."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import cached_alignment_adapter, lora_model, run_tiny_pipeline, stage_info

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES
from hftlab.defenses.safelora import projection_matrix
from hftlab.defenses.weights import lora_factors, lora_layers


def aligned_adapter_ctx(model_dir: Path, folder: Path) -> tuple[SimpleNamespace, dict]:
    """A run context whose alignment cache holds a random LoRA adapter (the 'alignment'), and
    {module: V = s·B·A} of that adapter in float64, computed from the live weights."""
    ctx, factors = cached_alignment_adapter(lora_model(model_dir), folder, 0.1, seed=0)
    return ctx, {name: scale * (b @ a) for name, (a, b, scale) in factors.items()}


def hand_projection(v: torch.Tensor) -> torch.Tensor:
    return v @ v.T / torch.sqrt((v ** 2).sum())


def hand_cosine(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    delta = (b @ a).reshape(-1)
    projected = (c @ b @ a).reshape(-1)
    return float(delta @ projected / (delta.norm() * projected.norm()))


def test_projection_matrix_is_v_vt_over_frobenius_norm() -> None:
    v = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    norm = math.sqrt(1 + 4 + 1 + 9)
    expected = torch.tensor([[5.0, -2.0], [-2.0, 10.0]]) / norm  # V·Vᵀ by hand
    assert torch.allclose(projection_matrix(v), expected, atol=1e-7)
    assert projection_matrix(v).dtype == torch.float32
    assert torch.equal(projection_matrix(torch.zeros(2, 3)), torch.zeros(2, 2))


@pytest.mark.parametrize("select", ["threshold", "number"])
def test_safelora_matches_direct_computation(tiny_model_dir, tiny_lora, tmp_path,
                                             select) -> None:
    ctx, vectors = aligned_adapter_ctx(tiny_model_dir, tmp_path / "align")
    layers = lora_layers(tiny_lora)
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    hand_c, hand_cos = {}, {}
    for name, layer in layers.items():
        a, b, _ = lora_factors(layer)
        hand_c[name] = hand_projection(vectors[name])
        hand_cos[name] = hand_cosine(hand_c[name], a.double(), b.double())
    ranked = sorted(hand_cos, key=hand_cos.get)
    if select == "threshold":
        # a cut halfway between two neighbouring cosines, far from the 5-decimal rounding
        i = max(range(3, len(ranked) - 3),
                key=lambda j: hand_cos[ranked[j + 1]] - hand_cos[ranked[j]])
        threshold = (hand_cos[ranked[i]] + hand_cos[ranked[i + 1]]) / 2
        options = {"select": "threshold", "threshold": threshold}
        expected = {n for n, c in hand_cos.items() if c <= threshold}
    else:
        options = {"select": "number", "num_proj_layers": 3}
        expected = set(ranked[:3])
    defense = DEFENSES.get("safelora")(**options)
    out = defense.post_finetune(tiny_lora, ctx)
    assert out is tiny_lora
    report = defense.report("post_finetune")
    assert report["cosines"].keys() == hand_cos.keys()
    for name, cos in hand_cos.items():
        assert report["cosines"][name] == pytest.approx(cos, abs=1e-5), name
    assert set(report["projected"]) == expected and report["n_projected"] == len(expected)
    assert 0 < len(expected) < len(layers)
    assert report["no_alignment_vector"] == []
    b_names = {f"base_model.model.{n}.lora_B.default.weight": n for n in layers}
    for pname, p in tiny_lora.named_parameters():
        module = b_names.get(pname)
        if module in expected:  # B ← C·B, from the original B
            want = hand_c[module] @ before[pname].double()
            assert torch.allclose(p.double(), want, atol=1e-6, rtol=1e-5), pname
            assert not torch.equal(p, before[pname])
        else:  # lora_A everywhere, lora_B of the other layers, every base weight
            assert torch.equal(p, before[pname]), pname
    for name, layer in layers.items():  # the matrix the defense used is the hand one
        v = vectors[name].float()
        assert torch.allclose(projection_matrix(v).double(), hand_c[name], atol=1e-6)
        assert layer.lora_B["default"].weight.dtype == torch.float32


def test_safelora_defaults_and_validation(tiny_model_dir) -> None:
    cls = DEFENSES.get("safelora")
    opts = cls().options
    # IBM/SafeLoRA config.py (SafeLoRAConfig): select_layers_type="number", threshold=0.5,
    # num_proj_layers=10
    assert (opts.select, opts.threshold, opts.num_proj_layers) == ("number", 0.5, 10)
    assert cls.stages == ("post_finetune",) and cls().cache_key("alignment") is None
    for bad in ({"select": "all"}, {"num_proj_layers": 0}, {"threshold": 1.5},
                {"thresh": 0.3}):
        with pytest.raises(ConfigError):
            cls(**bad)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(ConfigError, match="method: lora"):  # full fine-tuning has no LoRA
        cls().post_finetune(plain, SimpleNamespace())


def test_safelora_end_to_end(tiny_overrides, tmp_path) -> None:
    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, "defense=safelora")
    repair = metrics["repair"]
    assert repair is not None
    for key in ("before.harmful_score", "before.finetune_accuracy", "harmful_score_change",
                "finetune_accuracy_change"):
        assert math.isfinite(repair[key]), key
    report = repair["report"]
    assert report == stage_info(tmp_path, "post_finetune")["defense_report"]
    assert report["n_layers"] == 14  # 2 blocks × 7 linear modules
    assert report["n_projected"] >= 10 and report["no_alignment_vector"] == []
    assert all(math.isfinite(c) for c in report["cosines"].values())
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
