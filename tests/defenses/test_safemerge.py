"""SafeMERGE flags exactly the layers with cos(C·B·A, B·A) < threshold and merges only those,
factor by factor with √(w·s) weights as PEFT's add_weighted_adapter does (checked by hand and
against PEFT itself); TIES and DARE match hand computations on fixed tensors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import cached_alignment_adapter, lora_model, run_tiny_pipeline, stage_info

from hftlab.config import ConfigError, LoraConfig, TrainConfig
from hftlab.defenses import DEFENSES
from hftlab.defenses.safemerge import combine
from hftlab.defenses.weights import lora_factors, lora_layers

SCALE = 2.0  # lora_model: r = 4, alpha = 8


def safety_ctx(model_dir: Path, folder: Path, rank: int = 4) -> tuple[SimpleNamespace, dict]:
    """A run context whose alignment cache holds a random LoRA adapter (the safety LoRA), and
    {module: (A, B, scale)} of that adapter in float64."""
    safety = lora_model(model_dir)
    if rank != 4:
        from transformers import AutoModelForCausalLM

        from hftlab.model import attach_trainable

        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        safety = attach_trainable(plain, TrainConfig(lora=LoraConfig(r=rank, alpha=2 * rank)))
    return cached_alignment_adapter(safety, folder, 0.3, seed=3)


def hand_cosines(model, safety: dict) -> dict[str, float]:
    cosines = {}
    for name, layer in lora_layers(model).items():
        a, b, _ = (t.double() if torch.is_tensor(t) else t for t in lora_factors(layer))
        a_s, b_s, s_s = safety[name]
        v = s_s * b_s @ a_s
        c = v @ v.T / torch.sqrt((v ** 2).sum())
        delta, projected = (b @ a).reshape(-1), (c @ b @ a).reshape(-1)
        cosines[name] = float(delta @ projected / (delta.norm() * projected.norm()))
    return cosines


def splitting_threshold(cosines: dict[str, float]) -> float:
    """A cut halfway across the widest gap among the middle cosines (far from the rounding)."""
    ranked = sorted(cosines.values())
    i = max(range(3, len(ranked) - 3), key=lambda j: ranked[j + 1] - ranked[j])
    return (ranked[i] + ranked[i + 1]) / 2


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: s * (b.double() @ a.double())
            for n, (a, b, s) in ((n, lora_factors(layer))
                                 for n, layer in lora_layers(model).items())}


def test_combine_linear_ties_dare_on_fixed_tensors() -> None:
    t1 = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    t2 = torch.tensor([[-2.0, 2.0], [1.0, 1.0]])
    w = [0.8, 0.2]
    assert torch.allclose(combine([t1, t2], w, "linear", 0.5), 0.8 * t1 + 0.2 * t2)
    # TIES, density 0.5 → keep 2 of 4: t1 → [[3, 0], [0, -4]], t2 → [[-2, 2], [0, 0]];
    # elected signs (sum) [[+, +], [+, -]]; agreeing weighted entries averaged.
    expected = torch.tensor([[0.8 * 3, 0.2 * 2], [0.0, 0.8 * -4]])
    assert torch.allclose(combine([t1, t2], w, "ties", 0.5), expected)
    # one entry, three tensors, no pruning: the sum elects +, the sign count elects −
    ts = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert torch.allclose(combine(ts, [1.0] * 3, "ties", 1.0, "total"), torch.tensor([5.0]))
    assert torch.allclose(combine(ts, [1.0] * 3, "ties", 1.0, "frequency"), torch.tensor([-1.0]))
    # DARE: Bernoulli(density) masks from the seeded generator, rescaled by 1/density
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    got = combine([a, b], w, "dare_linear", 0.5, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    m1 = torch.bernoulli(torch.full_like(a, 0.5), generator=gen)
    m2 = torch.bernoulli(torch.full_like(b, 0.5), generator=gen)
    assert torch.allclose(got, 0.8 * a * m1 / 0.5 + 0.2 * b * m2 / 0.5)
    assert 0 < m1.sum() < m1.numel()
    # the same as PEFT's merge utilities (the functions the reference's merger calls)
    from peft.utils.merge_utils import dare_linear, ties

    wt = torch.tensor(w)
    assert torch.allclose(combine([t1, t2], w, "ties", 0.5), ties([t1, t2], wt, 0.5))
    torch.manual_seed(7)
    assert torch.allclose(got, dare_linear([a, b], wt, 0.5))


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_safemerge_merges_exactly_the_flagged_layers(tiny_model_dir, tiny_lora, tmp_path,
                                                     method) -> None:
    ctx, safety = safety_ctx(tiny_model_dir, tmp_path / "align")
    cosines = hand_cosines(tiny_lora, safety)
    threshold = splitting_threshold(cosines)
    flagged = {n for n, c in cosines.items() if c < threshold}
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    old = deltas(tiny_lora)
    defense = DEFENSES.get("safemerge")(threshold=threshold, method=method)
    assert defense.post_finetune(tiny_lora, ctx) is tiny_lora
    report = defense.report("post_finetune")
    for name, cos in cosines.items():
        assert report["cosines"][name] == pytest.approx(cos, abs=1e-5), name
    assert set(report["merged"]) == flagged and 0 < len(flagged) < len(cosines)
    new = deltas(tiny_lora)
    for name in cosines:
        prefix = f"base_model.model.{name}.lora_"
        if name in flagged:
            continue
        assert torch.equal(new[name], old[name]), name
        for part in ("A", "B"):
            key = f"{prefix}{part}.default.weight"
            assert torch.equal(dict(tiny_lora.named_parameters())[key], before[key])
    for pname, p in tiny_lora.named_parameters():
        if "lora_" not in pname:
            assert torch.equal(p, before[pname]), pname
    if method == "linear":  # (Σ √(w·s) B_i)(Σ √(w·s) A_i) by hand, w = (0.8, 0.2), s = 2
        for name in flagged:
            layer = lora_layers(lora_model(tiny_model_dir))[name]  # the untouched fine-tuning
            a, b, s = lora_factors(layer)
            a_s, b_s, s_s = safety[name]
            want = ((math.sqrt(0.8 * s) * b.double() + math.sqrt(0.2 * s_s) * b_s)
                    @ (math.sqrt(0.8 * s) * a.double() + math.sqrt(0.2 * s_s) * a_s))
            assert torch.allclose(new[name], want, atol=1e-6, rtol=1e-5), name
    # PEFT's add_weighted_adapter (what the reference calls) gives the same merged delta
    peft_model = lora_model(tiny_model_dir)
    peft_model.load_adapter(str(tmp_path / "align" / "model"), adapter_name="safe")
    peft_model.add_weighted_adapter(["default", "safe"], [0.8, 0.2], "merged",
                                    combination_type=method, density=0.5)
    for name, layer in lora_layers(peft_model).items():
        if name in flagged:
            merged = layer.scaling["merged"] * (layer.lora_B["merged"].weight.double()
                                                @ layer.lora_A["merged"].weight.double())
            assert torch.allclose(new[name], merged, atol=1e-6, rtol=1e-5), name


def test_safemerge_dare_is_seeded_and_hand_computed(tiny_model_dir, tiny_lora, tmp_path) -> None:
    ctx, safety = safety_ctx(tiny_model_dir, tmp_path / "align")
    cosines = hand_cosines(tiny_lora, safety)
    threshold = splitting_threshold(cosines)
    untouched = {n: (a.clone(), b.clone(), s) for n, (a, b, s) in
                 ((n, lora_factors(layer)) for n, layer in lora_layers(tiny_lora).items())}
    defense = DEFENSES.get("safemerge")(threshold=threshold, method="dare_linear")
    defense.post_finetune(tiny_lora, ctx)
    new = deltas(tiny_lora)
    gen = torch.Generator().manual_seed(ctx.config.seed)  # the run's seed

    def dare(x, y, wx, wy):
        mx = torch.bernoulli(torch.full_like(x, 0.5), generator=gen)
        my = torch.bernoulli(torch.full_like(y, 0.5), generator=gen)
        return wx * x.double() * mx / 0.5 + wy * y.double() * my / 0.5

    flagged = [n for n in untouched if cosines[n] < threshold]  # module order
    assert defense.report("post_finetune")["merged"] == flagged
    for name, (a, b, s) in untouched.items():
        if name not in flagged:
            assert torch.equal(new[name], s * (b.double() @ a.double())), name
            continue
        a_s, b_s, s_s = safety[name]
        wf, ws = math.sqrt(0.8 * s), math.sqrt(0.2 * s_s)
        merged_a = dare(a, a_s.float(), wf, ws)
        merged_b = dare(b, b_s.float(), wf, ws)
        assert torch.allclose(new[name], merged_b @ merged_a, atol=1e-6, rtol=1e-5), name


def test_safemerge_defaults_and_validation(tiny_model_dir, tiny_lora, tmp_path) -> None:
    cls = DEFENSES.get("safemerge")
    opts = cls().options
    # aladinD/SafeMERGE get_safemerge_model.py: --cos_threshold 0.35, --weighting [0.8, 0.2],
    # --merge_type linear; README usage: --density 0.5; PEFT majority_sign_method "total"
    assert (opts.threshold, opts.task_weight, opts.safety_weight) == (0.35, 0.8, 0.2)
    assert (opts.method, opts.density, opts.majority_sign_method) == ("linear", 0.5, "total")
    assert cls.stages == ("post_finetune",) and cls().cache_key("alignment") is None
    for bad in ({"method": "slerp"}, {"density": 0.0}, {"density": 1.5}, {"threshold": 2.0},
                {"majority_sign_method": "mean"}, {"weights": [0.8, 0.2]}):
        with pytest.raises(ConfigError):
            cls(**bad)
    # a full-weight alignment has no safety LoRA to merge
    (tmp_path / "full" / "model").mkdir(parents=True)
    full = SimpleNamespace(stage_info=lambda stage: {"cache": str(tmp_path / "full")},
                           device=torch.device("cpu"), config=SimpleNamespace(seed=0))
    with pytest.raises(ConfigError, match="alignment.train.method: lora"):
        cls().post_finetune(tiny_lora, full)
    # ranks differ (safety r = 2, fine-tuning r = 4): refused before anything is edited
    ctx, _ = safety_ctx(tiny_model_dir, tmp_path / "r2", rank=2)
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    with pytest.raises(ConfigError, match="finetune.train.lora.r"):
        cls(threshold=1.0).post_finetune(tiny_lora, ctx)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lora.named_parameters())


def test_safemerge_end_to_end(tiny_overrides, tmp_path) -> None:
    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, "defense=safemerge")
    repair = metrics["repair"]
    assert repair is not None
    for key in ("before.harmful_score", "before.finetune_accuracy", "harmful_score_change",
                "finetune_accuracy_change"):
        assert math.isfinite(repair[key]), key
    report = repair["report"]
    assert report == stage_info(tmp_path, "post_finetune")["defense_report"]
    assert report["n_layers"] == 14 and report["no_safety_adapter"] == []
    assert report["merged"] == [n for n, c in report["cosines"].items() if c < 0.35]
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
