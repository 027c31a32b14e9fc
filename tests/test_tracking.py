"""Optional experiment tracking on the tiny pipeline: what each backend's local store holds
afterwards (read back with the backend's own reader), the checks before any work, and that
tracking off imports no tracking library."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hftlab.config import ConfigError, load_config
from hftlab.pipeline import run_pipeline

ALIGN_STEPS, FINETUNE_STEPS = 3, 4  # tests/conftest.py's TINY_OVERRIDES


def tracked_run(tiny_overrides: list[str], run: Path, backend: str, *extra: str) -> Any:
    config = load_config(None, [*tiny_overrides, f"tracking.backend={backend}", *extra])
    return run_pipeline(config, run)


# ------------------------------------------------------------------------- checks before work


def test_an_unknown_backend_fails_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="'tracking.backend' unknown tracking backend "
                       "'tensorbord'. Did you mean 'tensorboard'?"):
        load_config(None, ["tracking.backend=tensorbord"])


def test_a_uri_is_for_mlflow_only() -> None:
    with pytest.raises(ConfigError, match="only the mlflow backend reads it"):
        load_config(None, ["tracking.backend=wandb", "tracking.uri=http://localhost:5000"])


def test_a_missing_library_fails_before_the_run_folder_is_touched(
        tiny_overrides, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec says: not installed
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install "
                       r"'hftlab\[tracking\]'"):
        tracked_run(tiny_overrides, run, "wandb")
    assert not run.exists()


def test_tracking_is_not_part_of_the_run(tiny_config) -> None:
    """No cache key reads the tracking section (tests/stages/test_keys.py pins the keys)."""
    from hftlab.context import RunContext

    def keys(config) -> tuple[str, ...]:
        ctx = RunContext(config, Path("unused"))
        return ctx.alignment_key(), ctx.finetune_key(), ctx.eval_key()

    tracked = load_config(None, ["tracking.backend=tensorboard", "tracking.project=p"])
    tracked.model, tracked.cache_dir = tiny_config.model, tiny_config.cache_dir
    for name in ("alignment", "finetune", "mechanisms", "eval"):
        setattr(tracked, name, getattr(tiny_config, name))
    assert keys(tracked) == keys(tiny_config)


# ------------------------------------------------------------------------------ tensorboard


def tensorboard_events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_holds_curves_stage_records_scores_and_config(tiny_overrides,
                                                                   tmp_path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    metrics = tracked_run(tiny_overrides, run, "tensorboard")
    events = tensorboard_events(run / "tracking")
    scalars = set(events.Tags()["scalars"])
    for stage, steps in (("align", ALIGN_STEPS), ("finetune", FINETUNE_STEPS)):
        for name in ("loss", "lr", "tok_s"):
            points = events.Scalars(f"{stage}/{name}")
            assert [p.step for p in points] == list(range(1, steps + 1)), (stage, name)
        assert events.Scalars(f"stage/{stage}/steps")[0].value == steps
    assert all(p.value > 0 for p in events.Scalars("finetune/loss"))
    assert {"stage/data/timing/seconds", "stage/eval/timing/seconds"} <= scalars
    assert events.Scalars("final/harmful_score")[0].value == pytest.approx(
        metrics["harmful_score"])
    assert events.Scalars("final/finetune_accuracy")[0].value == pytest.approx(
        metrics["finetune_accuracy"])
    assert events.Scalars("aligned/harmful_score")[0].value == pytest.approx(
        metrics["aligned.harmful_score"])
    texts = {tag.split("/text_summary")[0]: events.Tensors(tag)[0].tensor_proto.string_val[0]
             .decode() for tag in events.Tags()["tensors"]}
    assert '"finetune.train.lr": 0.0001' in texts["config"]
    assert "| final |" in texts["final_table"] and "| aligned |" in texts["final_table"]


def test_a_resumed_run_may_turn_tracking_on_and_logs_the_earlier_stages(
        tiny_config, tiny_overrides, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run_pipeline(tiny_config, run)
    assert not (run / "tracking").exists()
    tracked_run(tiny_overrides, run, "tensorboard")  # not "a different config": every stage skipped
    events = tensorboard_events(run / "tracking")
    scalars = set(events.Tags()["scalars"])
    assert "align/loss" not in scalars  # nothing was trained this time
    assert {"stage/align/steps", "stage/finetune/steps", "final/harmful_score"} <= scalars


# ---------------------------------------------------------------------------------- mlflow


def test_mlflow_file_store_holds_curves_params_scores_and_table(
        tiny_overrides, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after the test
    run = tmp_path / "run"
    metrics = tracked_run(tiny_overrides, run, "mlflow", "tracking.project=hft",
                          "tracking.args={team: safety}")
    client = MlflowClient(tracking_uri=(run / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("hft")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.tags["team"] == "safety"
    assert found.data.params["finetune.train.lr"] == "0.0001"
    assert found.data.metrics["final/harmful_score"] == pytest.approx(metrics["harmful_score"])
    assert found.data.metrics["stage/finetune/steps"] == FINETUNE_STEPS
    for stage, steps in (("align", ALIGN_STEPS), ("finetune", FINETUNE_STEPS)):
        history = client.get_metric_history(found.info.run_id, f"{stage}/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.json", "final_table.json", "final_table.md", "stages"} <= artifacts
    table = json.loads(Path(client.download_artifacts(found.info.run_id, "final_table.json",
                                                      str(tmp_path))).read_text())
    assert table["columns"][:3] == ["model", "harmful_score", "finetune_accuracy"]
    assert table["data"][-1][:2] == ["final", pytest.approx(metrics["harmful_score"])]


# ----------------------------------------------------------------------------------- wandb


def wandb_records(path: Path) -> list[Any]:
    """The records of a ``run-*.wandb`` file: a 7-byte header, then LevelDB-log chunks (7-byte
    headers: crc, length, type; full=1, first=2, middle=3, last=4) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_curves_scores_config_and_table(
        tiny_overrides, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    tracked_run(tiny_overrides, run, "wandb", "tracking.args={mode: offline}")
    [folder] = (run / "tracking" / "wandb").glob("offline-run-*")
    records = wandb_records(next(folder.glob("run-*.wandb")))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item} for r in records if r.HasField("history")]
    for stage, steps in (("align", ALIGN_STEPS), ("finetune", FINETUNE_STEPS)):
        assert [h[f"{stage}/step"] for h in history if f"{stage}/loss" in h] == list(
            range(1, steps + 1))
    summary = {item.key or "/".join(item.nested_key)
               for r in records if r.HasField("summary") for item in r.summary.update}
    assert {"final/harmful_score", "stage/finetune/steps"} <= summary
    config = {item.key for r in records if r.HasField("run") for item in r.run.config.update}
    assert "finetune.train.lr" in config
    assert list((folder / "files" / "media" / "table").glob("final_table_*.table.json"))


# ---------------------------------------------------------------------------- tracking off

OFF_SCRIPT = """
import sys
from pathlib import Path
from hftlab.config import load_config
from hftlab.pipeline import run_pipeline
run_pipeline(load_config(None, sys.argv[2:]), Path(sys.argv[1]))
print(sorted(m for m in ("wandb", "mlflow", "tensorboard") if m in sys.modules))
"""


def test_tracking_off_imports_no_tracking_library(tiny_overrides, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(tmp_path / "run"),
                           *tiny_overrides], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_step_hook_keeps_the_stage_callbacks_checkpoint_state() -> None:
    """A tracked stage's ``on_step`` saves and restores the mechanism tracker's state as the
    untracked one does (and saves none when the stage has no callback)."""
    from hftlab.tracking import StepLog, Tracker

    class Curves:
        def __init__(self) -> None:
            self.state = {"points": [1, 2]}

        def __call__(self, trainer: Any, loss: float) -> None: ...

        def state_dict(self) -> dict[str, Any]:
            return self.state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.state = state

    curves = Curves()
    hook = StepLog(Tracker(), "finetune", curves)
    assert hook.state_dict() == {"points": [1, 2]}
    hook.load_state_dict({"points": [3]})
    assert curves.state == {"points": [3]}
    assert StepLog(Tracker(), "align", None).state_dict() is None
    assert Tracker().step_callback("align", curves) is curves  # tracking off: unchanged
