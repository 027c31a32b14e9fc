"""Fixtures for the Virus tests: an aligned LoRA on the tiny random Llama, the surrogates built
on it, and the tiny Llama standing in for the guard model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from virus_helpers import ALIGNED_TARGETS, virus_surrogate

from hftlab.attacks.virus_surrogate import Surrogate


@pytest.fixture(scope="session")
def aligned_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved LoRA (r 4, α 8) with random A and B, standing in for the alignment's adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALIGNED_TARGETS, lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    folder = tmp_path_factory.mktemp("aligned") / "model"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def surrogate(tiny_model_dir: Path, aligned_adapter: Path) -> Surrogate:
    """The reference's surrogate: base model + aligned LoRA unmerged, gradient on the LoRA."""
    return virus_surrogate(tiny_model_dir, aligned_adapter)


@pytest.fixture(scope="module")
def guard_judge(tiny_model_dir: Path):
    """The llama_guard judge on the tiny random Llama (it shares the surrogate's vocabulary)."""
    from hftlab.judges import JUDGES

    return JUDGES.get("llama_guard")(model=str(tiny_model_dir), template="builtin",
                                     device="cpu", dtype="float32")
