"""Training checkpoints: committed as one unit (a kill at any file of a save resumes to the weights
of an uninterrupted run), stored without pickle (no file under a run folder runs code), and
read back exactly (every defense's state, the random generators)."""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from hftlab import checkpoint
from hftlab.checkpoint import checkpoint_step, decode, encode
from hftlab.config import ConfigError, LoraConfig, TrainConfig, load_config
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES
from hftlab.defenses.base import ALIGNMENT, FINETUNE
from hftlab.faults import SimulatedKill, fault_at
from hftlab.formatting import Tokenized
from hftlab.pipeline import CHECKPOINTS, run_pipeline
from hftlab.sweep import run_progress
from hftlab.testing import QUICK_STATE_OPTIONS

STAGE_DIRS = {ALIGNMENT: "align", FINETUNE: "finetune"}
# The changes one save of a single process makes to its stage's checkpoint folder, in order,
# when an older step is there (a stage's first save has no older step folder to delete).
SAVE_CHANGES = ["rng-0.safetensors", "rng-0.json", "trainer.safetensors", "trainer.json",
                "latest.json.tmp", "latest.json", "step-000001"]
FIRST_SAVE = len(SAVE_CHANGES) - 1


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "stages"}


def stage_info(run: Path, stage: str) -> dict:
    return json.loads((run / STAGE_DIRS[stage] / "stage.json").read_text())


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The aligned adapter (in the run's cache) and the fine-tuned one, by file and name."""
    folders = {"aligned": Path(stage_info(run, ALIGNMENT)["cache"]) / "model",
               "finetuned": run / "finetune" / "model"}
    return {f"{what}/{path.name}/{name}": tensor
            for what, folder in folders.items() for path in sorted(folder.glob("*.safetensors"))
            for name, tensor in safetensors.torch.load_file(path).items()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and got
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs"


# ------------------------------------------------------------------------------- kills


def test_a_save_makes_these_changes_in_this_order(tiny_overrides, tmp_path) -> None:
    run = tmp_path / "run"
    root = run / "finetune" / CHECKPOINTS
    with fault_at(-1, under=root) as seen:
        run_pipeline(load_config(None, [*tiny_overrides, "checkpoint_every=1"]), run)
    saves = [SAVE_CHANGES[:FIRST_SAVE], SAVE_CHANGES, [*SAVE_CHANGES[:-1], "step-000002"]]
    steps = [f"step-{step:06d}" for step in (1, 2, 3)]  # 4 steps: no save after the last
    expected = [root / name if name.startswith(("latest", "step")) else root / step / name
                for step, names in zip(steps, saves) for name in names]
    assert seen == [*expected, root]  # the folder's removal once the stage completed


@pytest.mark.parametrize("position", range(len(SAVE_CHANGES)),
                         ids=[f"{k}-{name}" for k, name in enumerate(SAVE_CHANGES)])
@pytest.mark.parametrize("stage", [ALIGNMENT, FINETUNE])
def test_a_kill_anywhere_in_a_save_resumes_to_the_uninterrupted_weights(
    stage: str, position: int, tiny_overrides, tmp_path
) -> None:
    """Killed before the ``position``-th change of the stage's second save (step 2): the rerun
    resumes from step 1 until the pointer has switched, from step 2 after."""
    config = load_config(None, [*tiny_overrides, "checkpoint_every=1"])
    run = tmp_path / "run"
    root = run / STAGE_DIRS[stage] / CHECKPOINTS
    with pytest.raises(SimulatedKill), fault_at(FIRST_SAVE + position, under=root):
        run_pipeline(config, run)
    committed = 2 if SAVE_CHANGES[position] == "step-000001" else 1
    assert checkpoint_step(root) == committed
    # the other step folder: the interrupted save's (incomplete) or the one it replaced
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001", "step-000002"]
    assert run_progress(run).endswith(f"{STAGE_DIRS[stage]} at step {committed}")
    resumed = run_pipeline(config, run)
    assert stage_info(run, stage)["resumed_from_step"] == committed
    assert not root.exists()  # removed once the stage completed
    plain = load_config(None, [*tiny_overrides, f"cache_dir={tmp_path / 'other-cache'}"])
    reference = run_pipeline(plain, tmp_path / "reference")
    assert_same_weights(final_weights(run), final_weights(tmp_path / "reference"))
    assert comparable(resumed) == comparable(reference)


# ----------------------------------------------------------------- nothing from disk runs


class Trap:
    """Unpickling it creates ``marker``: a stand-in for the code a crafted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def killed_after_first_save(tiny_overrides: list[str], run: Path) -> tuple[Any, Path]:
    """A run killed as its alignment's second save began: step 1 is committed."""
    config = load_config(None, [*tiny_overrides, "checkpoint_every=1"])
    root = run / "align" / CHECKPOINTS
    with pytest.raises(SimulatedKill), fault_at(FIRST_SAVE, under=root):
        run_pipeline(config, run)
    assert checkpoint_step(root) == 1
    return config, root


OLD_FORMAT = ["trainer.pt", "rng-0.pt"]


@pytest.mark.parametrize("planted", [
    *OLD_FORMAT, "latest.json", "step-000001/trainer.json", "step-000001/trainer.safetensors",
    "step-000001/rng-0.json", "step-000001/rng-0.safetensors",
])
def test_a_planted_pickle_is_never_unpickled(planted: str, tiny_overrides, tmp_path) -> None:
    run = tmp_path / "run"
    config, root = killed_after_first_save(tiny_overrides, run)
    if planted in OLD_FORMAT:  # what hftlab before format 2 left: its files alone
        shutil.rmtree(root)
        root.mkdir()
    marker = tmp_path / "code-ran"
    target = root / planted
    target.write_bytes(pickle.dumps(Trap(marker)))
    pointer_intact = planted not in [*OLD_FORMAT, "latest.json"]
    assert checkpoint_step(root) == (1 if pointer_intact else None)
    assert run_progress(run) == ("after data, align at step 1" if pointer_intact
                                 else "after data")
    with pytest.raises(ConfigError) as failure:
        run_pipeline(config, run)
    message = str(failure.value)
    assert "\n" not in message and target.name in message and f"delete {root}" in message
    assert not marker.exists()
    pickle.loads(target.read_bytes())  # the trap was armed: unpickling it runs code
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
@pytest.mark.parametrize("name", ["trainer.safetensors", "trainer.json", "rng-0.safetensors"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(
    name: str, damage: str, tiny_overrides, tmp_path
) -> None:
    config, root = killed_after_first_save(tiny_overrides, tmp_path / "run")
    path = root / "step-000001" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * len(data))
    with pytest.raises(ConfigError) as failure:
        run_pipeline(config, tmp_path / "run")
    message = str(failure.value)
    assert message.startswith(f"{path}: a damaged training checkpoint (")
    assert "\n" not in message and message.endswith(f"delete {root} to start the stage over")


def test_a_pointer_to_a_missing_step_folder_is_refused(tiny_overrides, tmp_path) -> None:
    config, root = killed_after_first_save(tiny_overrides, tmp_path / "run")
    shutil.rmtree(root / "step-000001")
    with pytest.raises(ConfigError, match=r"latest\.json: names step-000001, which is missing"):
        run_pipeline(config, tmp_path / "run")


def test_checkpoint_step_reads_the_pointer_alone(tmp_path) -> None:
    assert checkpoint_step(tmp_path / "nothing") is None
    (tmp_path / "step-000007").mkdir()
    (tmp_path / "step-000007" / "trainer.json").write_text("not read")
    (tmp_path / "latest.json").write_text(
        json.dumps({"format": checkpoint.FORMAT, "step": 7, "folder": "step-000007"}))
    assert checkpoint_step(tmp_path) == 7
    for pointer in ({"format": 1, "step": 7, "folder": "step-000007"},
                    {"format": checkpoint.FORMAT, "step": 7, "folder": "../elsewhere"}):
        (tmp_path / "latest.json").write_text(json.dumps(pointer))
        assert checkpoint_step(tmp_path) is None


def test_an_uncommitted_step_folder_is_ignored_and_removed(tmp_path) -> None:
    for step in (1, 2):
        checkpoint.step_folder(tmp_path, step).mkdir()
        checkpoint.write_state(checkpoint.step_folder(tmp_path, step), "trainer", {"step": step})
    checkpoint.commit(tmp_path, checkpoint.step_folder(tmp_path, 1), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000001"]
    checkpoint.step_folder(tmp_path, 2).mkdir()  # a save killed before its commit
    (tmp_path / "latest.json.tmp").write_text("{")
    folder = checkpoint.committed_folder(tmp_path, "fix")
    assert folder == checkpoint.step_folder(tmp_path, 1)
    checkpoint.remove_uncommitted(tmp_path, keep=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000001"]
    assert checkpoint.read_state(folder, "trainer", "fix") == {"step": 1}


# ------------------------------------------------------------------------------ the codec


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, all the way down (nan equals nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, (float, np.floating)):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) ==
                                                     math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def round_trip(value: Any, tmp_path: Path) -> Any:
    """``value`` through the files a checkpoint writes."""
    checkpoint.write_state(tmp_path, "state", {"value": value})
    return checkpoint.read_state(tmp_path, "state", "fix")["value"]


def test_the_codec_gives_back_every_kind_of_value(tmp_path) -> None:
    shared = torch.arange(6.0)
    value = {
        "floats": [0.1, -0.0, math.inf, -math.inf, math.nan, 1e308, 5e-324],
        "ints": [0, -1, 2**127 + 3, True, None, "text"],
        "tuple": (1, (2.5, "x"), [3, ()]),
        "int keys": {0: {"exp_avg": torch.ones(2, 3)}, 1: {"step": torch.tensor(4.0)}},
        "other keys": {(1, 2): "pair", 3.5: None, None: 1, False: "f"},
        "tag-like": {"__tuple__": [1], "__tensor__": "x"},
        "tensors": [torch.zeros(0), torch.tensor(7, dtype=torch.int64),
                    torch.randn(3, 2, dtype=torch.bfloat16), torch.randn(4, 4).t(),
                    torch.tensor([1, 255], dtype=torch.uint8), shared, shared[2:4]],
        "arrays": [np.arange(5, dtype=np.uint32), np.float64(2.5) * np.ones((2, 2)),
                   np.array(3, dtype=np.int16), np.array([True, False]), np.zeros((0, 3))],
        "numpy scalars": [np.int64(-4), np.float32(0.1), np.bool_(True), np.uint8(200)],
    }
    tree, tensors = encode(value)
    json.dumps(tree, allow_nan=False)  # strict JSON: no NaN or Infinity tokens
    assert same(decode(json.loads(json.dumps(tree)), tensors), value)
    assert same(round_trip(value, tmp_path), value)


def test_the_codec_refuses_what_it_cannot_store(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"defense/trace/0: cannot store a set"):
        encode({"defense": {"trace": [{1, 2}]}})
    with pytest.raises(TypeError, match="object array"):
        encode({"x": np.array([object()])})


def test_random_generators_continue_exactly_after_a_round_trip(tmp_path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(1)  # numpy keeps a cached gaussian
    generators = {"random": random.Random(4), "numpy": np.random.default_rng(5),
                  "torch": torch.Generator().manual_seed(6)}
    saved = round_trip({"global": checkpoint.rng_state(),
                        "random": generators["random"].getstate(),
                        "numpy": generators["numpy"].bit_generator.state,
                        "torch": generators["torch"].get_state()}, tmp_path)

    def draws() -> list[float]:
        return [random.random(), float(np.random.normal()), float(torch.randn(1)),
                generators["random"].random(), float(generators["numpy"].normal()),
                float(torch.randn(1, generator=generators["torch"]))]

    expected = draws()
    checkpoint.set_rng_state(saved["global"])
    generators["random"].setstate(saved["random"])
    generators["numpy"].bit_generator.state = saved["numpy"]
    generators["torch"].set_state(saved["torch"])
    assert draws() == expected


# -------------------------------------------------------------------- every defense's state



def token_items(n: int, seed: int) -> list[Tokenized]:
    rng = random.Random(seed)
    return [Tokenized([rng.randrange(4, 200) for _ in range(rng.randrange(6, 12))], 3)
            for _ in range(n)]


class Curve:
    """A resumable ``on_step`` callback, as the mechanism tracker is."""

    def __init__(self) -> None:
        self.points: list[dict[str, float | None]] = []

    def __call__(self, trainer: Any, loss: float) -> None:
        self.points.append({"loss": loss, "none": None, "nan": math.nan})

    def state_dict(self) -> dict[str, Any]:
        return {"points": copy.deepcopy(self.points)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = state["points"]


@pytest.mark.parametrize("name", [n for n in DEFENSES.names()
                                  if n == "sft" or DEFENSES.get(n).resume_attributes])
def test_every_defense_state_is_read_back_as_saved(
    name: str, tiny_model_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from hftlab.model import attach_trainable
    from hftlab.train import RunView, SFTTrainer

    written: dict[str, Any] = {}
    write = checkpoint.write_state

    def recording(folder: Path, state_name: str, state: Any) -> int:
        written[state_name] = copy.deepcopy(state)
        return write(folder, state_name, state)

    monkeypatch.setattr(checkpoint, "write_state", recording)
    stage = ALIGNMENT if ALIGNMENT in DEFENSES.get(name).stages else FINETUNE
    items = token_items(12, seed=99)
    view = RunView(alignment=[Example("p", "r")] * len(items),
                   provider_harmful=[Example("p", "r", True)] * len(items),
                   tokenize=lambda examples, max_length: items, folder=tmp_path / "finetune")
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, lora=LoraConfig(r=4, alpha=8))
    model = attach_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    defense = DEFENSES.get(name)(**QUICK_STATE_OPTIONS.get(name, {}))
    trainer = SFTTrainer(model, cfg, Accelerator(cpu=True), 0, stage, defense, seed=3,
                         run=view,
                         checkpoint_dir=tmp_path / "checkpoint", checkpoint_every=3)
    trainer.train(token_items(10, seed=1), on_step=Curve())
    folder = tmp_path / "checkpoint" / "step-000003"
    assert written.keys() == {"trainer", "rng-0"}
    for state_name, state in written.items():
        assert same(checkpoint.read_state(folder, state_name, "fix"), state), state_name
