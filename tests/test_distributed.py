"""Data parallel on this CPU: 2 gloo processes (torchrun) train and evaluate the tiny model as
one process does, and a defense that is not data-parallel refuses before writing anything.

Tolerance: 2 processes add the two halves' gradients (each weighed by its share of the batch's
supervised tokens) where one process forms one mean, in another float32 summation order and with
matrix products of other heights; the adapters agree to ~1e-7 relative. ATOL below allows 1e-5
(float32 rounding amplified by Adam's division by √v over a few steps), far below a step's size
(lr 2e-4 · a few steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hftlab.cli import main
from hftlab.utils import read_jsonl

ATOL = 1e-5
RUN = ["checkpoint_every=0", "eval.batch_size=2"]  # 3 batches of the 6 prompts: uneven split


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m hftlab run ...`` on gloo, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "hftlab", "run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def adapter(run: Path, stage: str = "finetune") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / stage / "model").rglob("*.safetensors"))
    assert files, f"no weights saved in {run / stage}"
    return load_file(str(files[0]))


def completions(run: Path) -> list[str]:
    return [row["completion"] for row in read_jsonl(run / "eval" / "completions.jsonl")]


def one_and_two(tiny_overrides: list[str], tmp_path: Path, extra: list[str], name: str
                ) -> tuple[Path, Path]:
    """A 1-process run (in this process) and a 2-process one of the same config, with their
    own caches (so the 2-process run trains every stage)."""
    base = [o for o in tiny_overrides if not o.startswith("cache_dir=")]
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
    assert main(["run", str(config), *base, *RUN, *extra, f"cache_dir={tmp_path / 'c1'}",
                 "--out", str(one)]) == 0
    done = launch([str(config), *base, *RUN, *extra, f"cache_dir={tmp_path / 'c2'}",
                   "--out", str(two)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two


def assert_same_adapter(one: Path, two: Path, stage: str = "finetune") -> None:
    a, b = adapter(one, stage), adapter(two, stage)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=ATOL, rtol=0), key


def test_distributed_sft_matches_one_process(tiny_overrides, tmp_path) -> None:
    one, two = one_and_two(tiny_overrides, tmp_path, ["defense=sft"], "sft")
    assert_same_adapter(one, two)
    assert completions(one) == completions(two)  # (b) the same greedy completions, in order
    assert (two / "metrics.json").exists() and (two / "report.md").exists()


@pytest.mark.parametrize("defense", ["vaccine", "ewc", "antidote"])  # align, finetune, repair
def test_distributed_defense_of_each_stage(defense, tiny_overrides, tmp_path) -> None:
    one, two = one_and_two(tiny_overrides, tmp_path, [f"defense={defense}"], defense)
    assert_same_adapter(one, two, "post_finetune" if defense == "antidote" else "finetune")
    assert completions(one) == completions(two)


def test_distributed_refusal_is_one_line_and_writes_nothing(tiny_overrides, tmp_path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = tmp_path / "refused"
    done = launch([str(config), *tiny_overrides, "defense=booster", "--out", str(out)], tmp_path)
    assert done.returncode != 0
    lines = {line for line in done.stderr.splitlines() if line.startswith("hftlab: error:")}
    assert len(lines) == 1, done.stderr[-3000:]
    assert "'booster' cannot run data-parallel" in lines.pop()
    assert not out.exists() and not (tmp_path / "cache").exists()
