"""A stage whose loss stops being finite ends with one clear line, and leaves nothing behind that
a later run would take for a trained model (no cache entry, no checkpoint of the diverged
weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hftlab.cli import main
from hftlab.config import ConfigError
from hftlab.pipeline import run_pipeline
from hftlab.train import Batch, SFTTrainer, TrainingError


def committed_entries(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).glob("*/meta.json"))


def test_an_infinite_learning_rate_stops_the_alignment(tiny_config, tmp_path) -> None:
    tiny_config.alignment.train.lr = float("inf")  # set after validation, which refuses it
    tiny_config.checkpoint_every = 1
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as failure:
        run_pipeline(tiny_config, run)
    message = str(failure.value)
    assert isinstance(failure.value, ConfigError) and "\n" not in message
    assert message.startswith("alignment: the training loss is nan at step ")
    assert message.endswith("lower the learning rate (alignment.train.lr, now inf) or check "
                            "the training data")
    assert committed_entries(Path(tiny_config.cache_dir), "aligned") == []
    assert not (run / "align" / "stage.json").exists()
    step = int(message.split(" at step ")[1].split()[0])
    # the last checkpoint is of the step before: the diverged step was never applied
    pointer = (run / "align" / "checkpoint" / "latest.json")
    assert step > 1 and f'"step": {step - 1}' in pointer.read_text()


def test_a_nan_loss_in_fine_tuning_is_one_line_from_the_command_line(
    tiny_overrides, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    compute_loss = SFTTrainer.compute_loss

    def nan_in_finetuning(self: SFTTrainer, batch: Batch) -> torch.Tensor:
        loss = compute_loss(self, batch)
        return loss * float("nan") if self.stage == "finetune" else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_in_finetuning)
    out = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err  # progress bars, then the error
    assert "Traceback" not in err
    assert re.fullmatch(r"hftlab: error: finetune: the training loss is nan at step 1 of 4: the "
                        r"weights diverged; lower the learning rate \(finetune\.train\.lr, now "
                        r"[0-9.e-]+\) or check the training data", err.strip().splitlines()[-1])
    cache = tmp_path / "cache"
    assert len(committed_entries(cache, "aligned")) == 1  # the alignment itself trained fine
    assert committed_entries(cache, "finetuned") == []
    assert not (out / "finetune" / "model").exists()
    assert not (out / "finetune" / "stage.json").exists()
