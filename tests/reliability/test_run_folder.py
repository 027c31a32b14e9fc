"""The run folder (--out): hftlab deletes only what it wrote, and writes nothing before the whole
experiment (config, plug-ins, data) has been checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.cli import main

USER_FILES = {"data/important.csv": "a,b\n1,2\n", "eval/notes.txt": "mine\n",
              "report.md": "# my notes\n"}
BAD_DATA = "finetune.task_data={kind: sst2, path: /nonexistent.tsv, n: 300}"


def plant(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run(args: list[str], tiny_overrides: list[str], out: Path) -> int:
    return main(["run", "configs/quickstart.yaml", *tiny_overrides, *args, "--out", str(out)])


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("overrides", [[], [BAD_DATA]], ids=["valid", "bad-data"])
def test_a_folder_of_user_files_is_never_touched(force, overrides, tiny_overrides, tmp_path,
                                                 capsys) -> None:
    out = tmp_path / "mine"
    plant(out, USER_FILES)
    before = snapshot(out)
    assert run([*overrides, *(["--force"] if force else [])], tiny_overrides, out) == 2
    assert snapshot(out) == before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds no hftlab run" in err


@pytest.mark.parametrize("config_text", ["model: {name: x}\n", "just text\n", "seed: [\n",
                                         "finetune: {}\ndefense: sft\nmystery: 1\n"],
                         ids=["partial", "scalar", "broken-yaml", "unknown-key"])
def test_a_foreign_config_yaml_does_not_make_a_run_folder(config_text, tiny_overrides,
                                                          tmp_path) -> None:
    out = tmp_path / "other-tool"
    plant(out, {"config.yaml": config_text, "data/x.bin": "payload"})
    before = snapshot(out)
    assert run(["--force"], tiny_overrides, out) == 2
    assert snapshot(out) == before


@pytest.mark.parametrize("bad", [BAD_DATA, "finetune.harmful_data={kind: beavertails, "
                                 "path: /missing.jsonl}", "eval.judge=keywrd",
                                 "defense_args={lamb: 1}"],
                         ids=["task-data", "harmful-data", "judge", "defense-args"])
def test_a_rejected_run_writes_nothing(bad, tiny_overrides, tmp_path, capsys) -> None:
    out = tmp_path / "new"
    assert run([bad], tiny_overrides, out) == 2
    assert not out.exists() or not any(out.iterdir())
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_fixed_rerun_of_a_rejected_config_is_accepted(tiny_overrides, tmp_path) -> None:
    out = tmp_path / "run"
    assert run([BAD_DATA], tiny_overrides, out) == 2
    assert run(["finetune.train.max_steps=1", "eval.eval_base=false"], tiny_overrides, out) == 0
    assert (out / "metrics.json").is_file()


def test_force_on_a_run_folder_removes_only_what_hftlab_wrote(tiny_overrides, tmp_path) -> None:
    out = tmp_path / "run"
    assert run(["eval.eval_base=false"], tiny_overrides, out) == 0
    plant(out, {"my_notes.txt": "keep\n", "plots/mine.png": "png"})
    assert run(["eval.eval_base=false", "--force"], tiny_overrides, out) == 0
    assert (out / "my_notes.txt").read_text() == "keep\n"
    assert (out / "plots" / "mine.png").read_text() == "png"
    assert (out / "metrics.json").is_file()


def test_force_with_bad_data_keeps_the_finished_run(tiny_overrides, tmp_path) -> None:
    out = tmp_path / "run"
    assert run(["eval.eval_base=false"], tiny_overrides, out) == 0
    before = snapshot(out)
    assert run(["eval.eval_base=false", BAD_DATA, "--force"], tiny_overrides, out) == 2
    assert snapshot(out) == before
