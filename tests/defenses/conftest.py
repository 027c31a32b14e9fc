"""Fixtures for the defense tests (helpers for hand computations live in defense_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from defense_helpers import lora_model


@pytest.fixture
def tiny_lora(tiny_model_dir: Path) -> torch.nn.Module:
    return lora_model(tiny_model_dir)
