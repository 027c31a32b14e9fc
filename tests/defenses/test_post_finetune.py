"""The post-fine-tuning stage as the pipeline runs it: the repaired model is what gets served,
metrics.json reports the model before and after the repair, the alignment cache is shared with
plain sft and left untouched, and the shared weight helpers compute V and ΔW exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from hftlab.config import load_config
from hftlab.context import RunContext
from hftlab.defenses import DEFENSES, POST_FINETUNE, Defense
from hftlab.defenses.weights import (
    adapter_vectors,
    alignment_vectors,
    layer_index,
    lora_delta,
    lora_layers,
)
from hftlab.pipeline import run_pipeline
from hftlab.report import write_report
from hftlab.stage_models import aligned_model, deployed_model, finetuned_model


class ZeroFirstLayer(Defense):
    """Test repair: zero the fine-tuning adapter's B in decoder block 0."""

    summary = "test repair"
    stages = (POST_FINETUNE,)

    def post_finetune(self, model: torch.nn.Module, ctx: Any) -> torch.nn.Module:
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                if layer_index(name) == 0:
                    layer.lora_B["default"].weight.zero_()
        self.zeroed = sum(layer_index(n) == 0 for n in lora_layers(model))
        return model

    def report(self, stage: str) -> dict[str, Any]:
        return {"zeroed_layers": self.zeroed} if stage == POST_FINETUNE else {}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repair_defense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DEFENSES._items, "test_zero_first_layer", ZeroFirstLayer)


def test_repair_is_served_and_reported_before_and_after(
    repair_defense, tiny_overrides, tmp_path
) -> None:
    sft = run_pipeline(load_config(None, tiny_overrides), tmp_path / "sft")
    align_dir = Path(RunContext(load_config(None, tiny_overrides), tmp_path / "sft")
                     .stage_info("align")["cache"])
    before_digest = tree_digest(align_dir / "model")

    config = load_config(None, [*tiny_overrides, "defense=test_zero_first_layer"])
    run = tmp_path / "repair"
    metrics = run_pipeline(config, run)
    ctx = RunContext(config, run)

    # post-fine-tuning repairs reuse sft's aligned checkpoint and never write into it
    assert ctx.stage_info("align")["cache"] == str(align_dir)
    assert ctx.stage_info("align")["cached"] is True
    assert tree_digest(align_dir / "model") == before_digest

    repair = metrics["repair"]
    assert repair["report"] == {"zeroed_layers": 7}  # q k v o gate up down of block 0
    assert metrics["finetuned.harmful_score"] == repair["before.harmful_score"]
    assert repair["harmful_score_change"] == pytest.approx(
        metrics["harmful_score"] - repair["before.harmful_score"])
    assert (run / "eval" / "completions_finetuned.jsonl").is_file()
    # the repair reused sft's fine-tuning and its evaluation: "before" is sft's "final"
    assert metrics["stages"]["finetune"]["cached"] is True
    assert repair["before.harmful_score"] == sft["harmful_score"]
    assert repair["before.finetune_accuracy"] == sft["finetune_accuracy"]
    assert sft["repair"] is None and sft["finetuned.harmful_score"] is None

    # the served model is the repaired one: block 0 as aligned, later blocks fine-tuned
    served = dict(deployed_model(ctx).named_parameters())
    aligned = dict(aligned_model(ctx).named_parameters())
    tuned = dict(finetuned_model(ctx).merge_and_unload().named_parameters())
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(served[q0], aligned[q0]) and not torch.equal(tuned[q0], aligned[q0])
    assert torch.allclose(served[q1], tuned[q1])
    assert "before repair" in write_report(run)


def test_alignment_vectors_equal_aligned_minus_base(tiny_overrides, tmp_path) -> None:
    config = load_config(None, tiny_overrides)
    run_pipeline(config, tmp_path / "run")
    ctx = RunContext(config, tmp_path / "run")
    vectors = alignment_vectors(ctx, "test")
    base = dict(ctx.base_model().named_parameters())
    aligned = dict(aligned_model(ctx).named_parameters())
    assert len(vectors) == 14  # 7 LoRA targets × 2 blocks
    for module, v in vectors.items():
        direct = aligned[module + ".weight"].float() - base[module + ".weight"].float()
        torch.testing.assert_close(v, direct, atol=1e-6, rtol=1e-4)

    tuned = finetuned_model(ctx)
    layers = lora_layers(tuned)
    assert set(layers) == set(vectors)
    saved = adapter_vectors(ctx.stage_dir("finetune") / "model")
    for module, layer in layers.items():
        torch.testing.assert_close(lora_delta(layer), saved[module])


def test_layer_index() -> None:
    assert layer_index("model.layers.7.mlp.up_proj") == 7
    assert layer_index("lm_head") is None
