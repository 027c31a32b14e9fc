"""Ctrl-C ends a command in one line that says what is saved and how to resume, and training
stages checkpoint by time as well as by step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hftlab.interrupt import interrupted_message, note_checkpoint
from hftlab.progress import progress


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_alignment_prints_one_line_and_the_rerun_resumes(tiny_overrides,
                                                                        tmp_path) -> None:
    run = tmp_path / "run"
    pointer = run / "align" / "checkpoint" / "latest.json"
    args = ["run", "configs/quickstart.yaml", *tiny_overrides, "alignment.train.max_steps=200",
            "checkpoint_every=2", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C's default action in the child: an ignored SIGINT is inherited across exec, and a
    # test earlier in the session (a library's handler) may leave it ignored in this process
    proc = subprocess.Popen([sys.executable, "-m", "hftlab", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 60
    while not pointer.exists():  # the alignment has saved a checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hftlab:")]
    assert len(lines) == 1, err
    message = lines[0]
    assert message.startswith("hftlab: interrupted during alignment (16 rows) at step "), message
    saved = json.loads(pointer.read_text())["step"]
    assert f"saved: checkpoint at step {saved} in {pointer.parent}, finished stages;" in message
    assert message.endswith("; resume: hftlab " + " ".join(args)), message

    subprocess.run([sys.executable, "-m", "hftlab", *args], env=env, check=True,
                   capture_output=True, timeout=120)
    stage = json.loads((run / "align" / "stage.json").read_text())
    assert stage["resumed_from_step"] == saved and stage["steps"] == 200
    assert (run / "metrics.json").exists() and not pointer.exists()


def test_the_message_without_a_checkpoint_names_the_step_and_the_sweep_to_rerun() -> None:
    note_checkpoint("alignment", Path("/nonexistent/checkpoint"))
    try:
        with progress(40, "eval base", unit="prompt", enabled=False) as bar:
            bar.update(12)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        message = interrupted_message(["sweep", "configs/sweeps/my sweep.yaml"])
    # the noted checkpoint is gone (its stage finished): it is not claimed
    assert message == ("hftlab: interrupted during eval base at prompt 12/40; saved: finished "
                       "runs and stages; resume: hftlab sweep 'configs/sweeps/my sweep.yaml'")


def test_a_stage_checkpoints_when_its_minutes_are_up(tiny_model_dir, tmp_path) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from hftlab.config import LoraConfig, TrainConfig
    from hftlab.defenses import DEFENSES
    from hftlab.formatting import Tokenized
    from hftlab.model import attach_trainable
    from hftlab.train import SFTTrainer

    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=4, lora=LoraConfig(r=4, alpha=8))
    model = attach_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    saved = []

    def watch(trainer: SFTTrainer, loss: float) -> None:
        pointer = trainer.checkpoint_dir / "latest.json"
        saved.append(json.loads(pointer.read_text())["step"] if pointer.exists() else None)
        if trainer.step == 2:  # from now on, the minutes are up at every step
            trainer.checkpoint_minutes = 1e-9

    trainer = SFTTrainer(model, cfg, Accelerator(cpu=True), 0, "finetune",
                         DEFENSES.get("sft")(), seed=1, checkpoint_dir=tmp_path / "ckpt",
                         checkpoint_minutes=60.0)
    trainer.train([Tokenized(list(range(4 + i, 12 + i)), 2) for i in range(8)], on_step=watch)
    # on_step runs before the step's save: step 3 sees the save of step 2 (minutes up)
    assert saved == [None, None, 2, 3]
