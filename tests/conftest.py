"""Shared fixtures: a tiny random Llama (built once per session, no download) and a config
that drives every stage on it in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.config import load_config
from hftlab.testing import build_tiny_llama, demo_corpus

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", demo_corpus())


TINY_OVERRIDES = [
    "alignment.data.n=16",
    "alignment.train.max_steps=3",
    "alignment.train.batch_size=4",
    "finetune.n=20",
    "finetune.poison_ratio=0.2",
    "finetune.train.max_steps=4",
    "finetune.train.batch_size=4",
    "mechanisms.every=2",
    "mechanisms.alignment_data.n=6",
    "mechanisms.harmful_data.n=6",
    "eval.harmful.n=6",
    "eval.task.n=6",
    "eval.max_new_tokens=4",
    "eval.task_max_new_tokens=3",
    "eval.batch_size=4",
    "model.precision=fp32",
]


@pytest.fixture
def tiny_overrides(tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    return [f"model.name={tiny_model_dir}", f"cache_dir={tmp_path / 'cache'}", *TINY_OVERRIDES]


@pytest.fixture
def tiny_config(tiny_overrides: list[str]):
    return load_config(None, tiny_overrides)
