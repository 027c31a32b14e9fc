"""Every defense resumes a training stage from a checkpoint to exactly the weights, losses and
report of an uninterrupted run: its ``resume_attributes`` cover all the state it keeps between
steps (streams, generators, traces, counters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from defense_helpers import PAD_ID, lora_model, token_items

from hftlab.config import TrainConfig
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES
from hftlab.defenses.base import ALIGNMENT, FINETUNE, Defense
from hftlab.testing import QUICK_STATE_OPTIONS
from hftlab.train import RunView, SFTTrainer

# checkpoints after steps 2 and 4, killed in step 5's hook: the resumed run replays the first
# epoch's order (3 batches) and one batch of the second before it trains again
STEPS, EVERY, STOP_AT = 6, 2, 5


class Killed(Exception):
    pass


class StepLog:
    """A resumable ``on_step`` callback (as the mechanism tracker is) that can kill the run."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.losses: list[float] = []

    def __call__(self, trainer: SFTTrainer, loss: float) -> None:
        if trainer.step == self.kill_at:
            raise Killed
        self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])


def run_view(tmp_path: Path) -> RunView:
    """Provider harmful rows and alignment rows (the same token items for both)."""
    items = token_items(12, seed=99)
    return RunView(alignment=[Example("p", "r")] * len(items),
                   provider_harmful=[Example("p", "r", True)] * len(items),
                   tokenize=lambda examples, max_length: items, folder=tmp_path / "finetune")


def train(model_dir: Path, name: str, stage: str, folder: Path, kill_at: int | None):
    model = lora_model(model_dir)
    defense = DEFENSES.get(name)(**QUICK_STATE_OPTIONS.get(name, {}))
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=STEPS, schedule="cosine",
                      warmup_ratio=0.2)
    from accelerate import Accelerator

    trainer = SFTTrainer(model, cfg, Accelerator(cpu=True), PAD_ID, stage, defense, seed=3,
                         precision="fp32", run=run_view(folder),
                         checkpoint_dir=folder / "checkpoint", checkpoint_every=EVERY)
    log = StepLog(kill_at)
    result = trainer.train(token_items(10, seed=1), on_step=log)  # 3 batches: epochs cross
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
               if "lora_" in n}
    return weights, result, log.losses, defense.report(stage), trainer.resumed_from


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if "seconds" not in k}


def training_stage(name: str) -> str:
    stages = DEFENSES.get(name).stages
    return ALIGNMENT if ALIGNMENT in stages else FINETUNE


def trains(name: str) -> bool:
    """The defense acts in a training step (the others train as sft does)."""
    cls = DEFENSES.get(name)
    return name == "sft" or bool(cls.resume_attributes) or any(
        getattr(cls, hook) is not getattr(Defense, hook)
        for hook in ("setup", "loss", "training_step")
    )


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if trains(n)])
def test_resumed_stage_matches_uninterrupted(name: str, tiny_model_dir, tmp_path) -> None:
    stage = training_stage(name)
    straight = train(tiny_model_dir, name, stage, tmp_path / "straight", None)
    with pytest.raises(Killed):
        train(tiny_model_dir, name, stage, tmp_path / "resumed", STOP_AT)
    assert (tmp_path / "resumed" / "checkpoint" / "latest.json").is_file()
    resumed = train(tiny_model_dir, name, stage, tmp_path / "resumed", None)
    weights, result, losses, report, resumed_from = resumed
    assert straight[4] == 0 and resumed_from == 4
    assert result.steps == STEPS and result.losses == straight[1].losses
    assert result.tokens == straight[1].tokens
    assert losses == straight[2]
    assert without_timings(report) == without_timings(straight[3])
    for n, w in straight[0].items():
        assert torch.equal(weights[n], w), f"{name}: {n} differs after resuming"
