"""The command line's small options: --version, `list KIND [--json]`, sweep overrides and
--out, the data-root precedence (flag > HFTLAB_DATA_ROOT > config) and the modes of written
files under the user's umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from hftlab import __version__
from hftlab.cli import main
from hftlab.config import ConfigError, load_config
from hftlab.sweep import load_sweep
from hftlab.utils import atomic_dir, write_json


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hftlab {__version__}"


def test_list_one_kind_as_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "judges"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("judges:\n") and "defenses:" not in text and "keyword" in text
    assert main(["list", "defenses", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    names = [e["name"] for e in entries]
    assert "booster" in names and "sft" in names
    booster = entries[names.index("booster")]
    assert booster["paper"] and booster["reference"]
    assert "alpha" in booster["options"]
    assert any(row["key"] for row in booster["settings"])
    assert main(["list", "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert set(everything) == {"defenses", "attacks", "judges", "tasks"}
    assert {t["name"] for t in everything["tasks"]} >= {"sst2", "gsm8k"}


def test_list_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "defences"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def write_sweep(tmp_path: Path, tiny_overrides: list[str], grid: dict) -> Path:
    shared = {k: yaml.safe_load(v) for k, v in (w.split("=", 1) for w in tiny_overrides)}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "run.yaml", "set": shared, "grid": grid}))
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    return path


def test_sweep_overrides_and_out(tiny_overrides: list[str], tmp_path: Path) -> None:
    path = write_sweep(tmp_path, tiny_overrides, {"seed": [0, 1]})
    sweep = load_sweep(path, overrides=["finetune.n=12"], out=tmp_path / "elsewhere")
    assert sweep.out == tmp_path / "elsewhere"
    for run in sweep.runs:
        assert load_config(sweep.config, run.overrides).finetune.n == 12
    with pytest.raises(ConfigError, match="sets a key the grid varies"):
        load_sweep(path, overrides=["seed=3"])


def test_sweep_cli_takes_overrides_after_options(tiny_overrides: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_overrides, {"seed": [0]})
    out = tmp_path / "chosen"
    assert main(["sweep", str(path), "--dry-run", "--out", str(out), "finetune.n=12"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "finetune.n=12" in printed
    assert not out.exists()  # a dry run writes nothing


def test_environment_data_root_wins_over_the_configs(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, ["data_root=../shared/data"])
    monkeypatch.delenv("HFTLAB_DATA_ROOT", raising=False)
    assert config.resolved_data_root() == Path("../shared/data")
    monkeypatch.setenv("HFTLAB_DATA_ROOT", str(tmp_path))
    assert config.resolved_data_root() == tmp_path


def test_data_root_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("HFTLAB_DATA_ROOT", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("seed: 0\n")
    assert main(["run", str(config), "--data-root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-root" in err[0] and "no such folder" in err[0]
    assert "HFTLAB_DATA_ROOT" not in os.environ
    monkeypatch.setenv("HFTLAB_DATA_ROOT", "/somewhere/else")  # restored after the test
    assert main(["sweep", str(tmp_path / "none.yaml"), "--data-root", str(tmp_path)]) == 2
    assert os.environ["HFTLAB_DATA_ROOT"] == str(tmp_path.resolve())


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "entry") as folder:
            (folder / "weights.bin").write_bytes(b"0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "entry" / "weights.bin").stat().st_mode) == 0o666 & ~mask
