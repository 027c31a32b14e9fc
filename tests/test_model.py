from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.config import ConfigError, TrainConfig
from hftlab.model import attach_trainable, resolve_model_path


def test_folder_hub_id_and_missing_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    assert resolve_model_path("meta-llama/Llama-2-7b-hf", tmp_path) == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"), tmp_path)


def test_lora_targets_are_checked(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    train = TrainConfig()
    train.lora.target_modules = ["q_proj", "query_key_value"]
    with pytest.raises(ConfigError, match="query_key_value"):
        attach_trainable(model, train)
    peft_model = attach_trainable(model, TrainConfig())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unreachable_hub_id_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hftlab.config import ModelConfig
    from hftlab.model import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_tokenizer("no-such-org/no-such-model", ModelConfig())
