"""On a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs these with `-k cuda`):
the tiny-model pipeline trains and evaluates on the GPU, in bf16 where the device has it."""

from __future__ import annotations

import json

import pytest

from hftlab.config import load_config
from hftlab.pipeline import run_pipeline

torch = pytest.importorskip("torch")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_cuda_tiny_pipeline_runs_on_the_gpu(tiny_overrides, tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "model.precision=auto"])
    run_pipeline(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda")
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert 0 <= metrics["harmful_score"] <= 100
    assert metrics["stages"]["finetune"]["tokens"] > 0
    # the timing names the one GPU the run computed on, not every GPU of the node
    assert f"1× {torch.cuda.get_device_name(0)}" in metrics["stages"]["finetune"]["machine"]

