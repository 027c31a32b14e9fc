"""Bad command lines fail as one ``hftlab: error:`` line (exit 2) with a hint, and write nothing:
options mixed with overrides, unknown options, an --out that cannot be written, a model that is
neither local nor reachable (answered in seconds, not after a minute of retries), bad sweeps.
No test here touches the network: the one hub request is replaced."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.config import ConfigError

QUICKSTART = "configs/quickstart.yaml"
ROOT = Path(__file__).resolve().parents[2]
needs_permissions = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one ``hftlab: error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("hftlab: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ overrides after options

LATE_OVERRIDES = [
    (["--out", "{out}", "alignment.train.lr=.inf"], "'alignment.train.lr' must be a finite"),
    (["--force", "--out", "{out}", "finetune.poison_ratio=2"],
     r"'finetune.poison_ratio' must be in [0, 1]"),
    (["-v", "--out", "{out}", "seed=-1"], "'seed' must be in [0, 2147483647]"),
    (["seed=1", "--out", "{out}", "eval.batch_size=0", "--force"],
     "'eval.batch_size' must be a whole number ≥ 1"),
]


@pytest.mark.parametrize(("args", "message"), LATE_OVERRIDES,
                         ids=["after-out", "after-force-and-out", "after-verbose", "between"])
def test_overrides_after_options_are_read(args: list[str], message: str, tmp_path: Path,
                                          capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, *[a.format(out=out) for a in args]]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_late_overrides_apply_in_order(tmp_path: Path, monkeypatch) -> None:
    import hftlab.pipeline

    seen = {}

    def fake_run_pipeline(config, run_dir, force=False, experiment=None):
        seen.update(seed=config.seed, n=config.finetune.n, run_dir=run_dir, force=force)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(hftlab.pipeline, "run_pipeline", fake_run_pipeline)
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, "seed=1", "--out", str(out), "seed=2", "--force",
                 "finetune.n=7"]) == 2
    assert seen == {"seed": 2, "n": 7, "run_dir": out, "force": True}


# --------------------------------------------------------------------------- unknown options

UNKNOWN = [
    (["run", QUICKSTART, "--froce"], "unrecognized arguments: --froce (did you mean --force?)"),
    (["run", QUICKSTART, "--outt", "x"], "unrecognized arguments: --outt x (did you mean --out?)"),
    (["run", QUICKSTART, "--seed=2"], "key=value words without dashes, e.g. seed=2"),
    (["run", QUICKSTART, "--out", "x", "--poison-ratio", "0.2"], "e.g. poison_ratio=..."),
    (["run", QUICKSTART, "--out", "x", "seed", "2"], "unrecognized arguments: seed 2 (overrides "
     "look like key=value, e.g. seed=2); see `hftlab run --help`"),
    (["sweep", "s.yaml", "--workrs", "2"], "--workrs 2 (did you mean --workers?); see `hftlab "
     "sweep --help`"),
    (["sweep", "s.yaml", "--dry_run"], "(did you mean --dry-run?)"),
    (["report", "x", "--bogus"], "unrecognized arguments: --bogus; see `hftlab report --help`"),
    (["list", "--all"], "unrecognized arguments: --all"),
    (["judge", "eval", "--judge", "keyword", "--data", "x.jsonl", "--dat-root", "d"],
     "--dat-root d (did you mean --data-root?); see `hftlab judge --help`"),
    (["run"], "the following arguments are required: config"),
    (["run", QUICKSTART, "--out"], "argument --out: expected one argument"),
    ([], "the following arguments are required: command"),
    (["runn", QUICKSTART], "invalid choice: 'runn'"),
    (["sweep", "s.yaml", "--workers", "two"], "argument --workers: invalid int value: 'two'"),
]


@pytest.mark.parametrize(("argv", "message"), UNKNOWN,
                         ids=["typo-force", "typo-out", "dashed-setting", "dashed-setting-spaced",
                              "setting-without-equals", "sweep-typo", "sweep-underscore",
                              "report-unknown", "list-unknown", "judge-nested-typo",
                              "run-no-config", "out-without-value", "no-command",
                              "unknown-command", "not-an-int"])
def test_a_bad_command_line_is_one_line_with_a_hint(argv: list[str], message: str,
                                                    tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in the cases stay in the test's folder
    argv = [str(ROOT / a) if a == QUICKSTART else a for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ --out

def out_is_file(tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / "taken"
    target.write_text("mine\n")
    return target, "is a file, not a folder"


def out_under_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "taken").write_text("mine\n")
    return tmp_path / "taken" / "run", f"cannot be made: {tmp_path / 'taken'} is a file"


def out_deep_under_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "taken").write_text("mine\n")
    return tmp_path / "taken" / "a" / "b", f"cannot be made: {tmp_path / 'taken'} is a file"


def out_unwritable(tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / "locked"
    target.mkdir()
    target.chmod(0o555)
    return target, "is not writable; choose a folder you can write to"


def out_in_unwritable(tmp_path: Path) -> tuple[Path, str]:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "run", f"cannot be made: {parent} is not writable"


OUT_CASES = [
    pytest.param(out_is_file, id="is-a-file"),
    pytest.param(out_under_file, id="parent-is-a-file"),
    pytest.param(out_deep_under_file, id="ancestor-is-a-file"),
    pytest.param(out_unwritable, id="unwritable", marks=needs_permissions),
    pytest.param(out_in_unwritable, id="in-unwritable", marks=needs_permissions),
]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("make", OUT_CASES)
def test_an_out_that_cannot_be_written_is_refused_first(make, tmp_path: Path, capsys) -> None:
    out, message = make(tmp_path)
    before = snapshot(tmp_path)
    try:
        assert main(["run", QUICKSTART, "--out", str(out)]) == 2
        err = one_error_line(capsys)
        assert snapshot(tmp_path) == before
    finally:
        for folder in tmp_path.iterdir():
            if folder.is_dir():
                folder.chmod(0o755)  # so that pytest can remove it
    assert f"--out {out}" in err and message in err


@pytest.mark.parametrize("make", [out_unwritable, out_in_unwritable],
                         ids=["unwritable", "in-unwritable"])
def test_an_unwritable_out_as_the_os_reports_it(make, tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    """The same refusal where chmod cannot show it (root): os.access says no."""
    import hftlab.cli

    out, message = make(tmp_path)
    locked = tmp_path / "locked"
    real_access = os.access
    monkeypatch.setattr(hftlab.cli.os, "access",
                        lambda path, mode: Path(path) != locked and real_access(path, mode))
    try:
        assert main(["run", QUICKSTART, "--out", str(out)]) == 2
    finally:
        locked.chmod(0o755)
    assert message in one_error_line(capsys)
    assert list(locked.iterdir()) == []


def test_out_dir_from_the_config_is_checked_too(tmp_path: Path, capsys) -> None:
    target = tmp_path / "taken"
    target.write_text("mine\n")
    assert main(["run", QUICKSTART, f"out_dir={target}"]) == 2
    assert f"out_dir {target} is a file, not a folder" in one_error_line(capsys)
    assert target.read_text() == "mine\n"


# ------------------------------------------------------------------------------ hub models

@pytest.fixture
def offline_hub(monkeypatch, tmp_path: Path) -> Iterator[list[str]]:
    """An empty hub cache and a hub that does not answer; returns the URLs asked for."""
    import huggingface_hub
    from huggingface_hub import constants

    from hftlab import model

    asked: list[str] = []

    def unreachable(url: str, **kwargs) -> None:
        asked.append(url)
        raise ConnectionError("[Errno -2] Name or service not known (test)")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    model.hub_files_only.cache_clear()
    model.model_shape.cache_clear()
    yield asked
    model.hub_files_only.cache_clear()
    model.model_shape.cache_clear()


def run_model(name: str, tmp_path: Path, *extra: str) -> int:
    return main(["run", QUICKSTART, f"model.name={name}", f"cache_dir={tmp_path / 'cache'}",
                 *extra, "--out", str(tmp_path / "run")])


def test_an_unreachable_hub_id_fails_fast_in_one_line(offline_hub, tmp_path, capsys) -> None:
    start = time.monotonic()
    assert run_model("nonexistent-org/nonexistent-model", tmp_path) == 2
    assert time.monotonic() - start < 15
    err = one_error_line(capsys)
    assert ("model.name 'nonexistent-org/nonexistent-model' could not be loaded: it is neither "
            "a local folder/.gguf file nor reachable on the hub: the hub is not reachable") in err
    assert "set HF_HUB_OFFLINE=1" in err and "check the network" in err
    assert offline_hub == ["https://huggingface.co/nonexistent-org/nonexistent-model/resolve/"
                           "main/config.json"]  # one request, no retries
    assert not (tmp_path / "run").exists()


def test_a_hub_id_the_hub_does_not_know(offline_hub, tmp_path, monkeypatch, capsys) -> None:
    httpx = pytest.importorskip("httpx2")
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(url: str, **kwargs) -> None:
        response = httpx.Response(404, request=httpx.Request("HEAD", url))
        raise RepositoryNotFoundError("404 Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)
    assert run_model("some-org/no-such-model", tmp_path) == 2
    assert "the hub has no such model (or it is private" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_offline_mode_without_a_cached_copy(offline_hub, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_model("some-org/uncached-model", tmp_path) == 2
    err = one_error_line(capsys)
    assert "it is not in the local hub cache and HF_HUB_OFFLINE is set" in err
    assert offline_hub == []  # offline means no request at all
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "message"), [
    ("/nonexistent/model/folder", "neither a local folder/.gguf file (no such path) nor a hub id"),
    ("~/no/such/model", "neither a local folder/.gguf file (no such path) nor a hub id"),
    ("models/missing-folder", "nor reachable on the hub: the hub is not reachable"),
    ("/nonexistent/model.gguf", "GGUF file /nonexistent/model.gguf does not exist"),
], ids=["absolute-path", "home-path", "relative-typo", "gguf"])
def test_a_missing_local_model_is_one_line(name: str, message: str, offline_hub, tmp_path,
                                           capsys) -> None:
    assert run_model(name, tmp_path) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_folder_without_config_json(offline_hub, tmp_path, capsys) -> None:
    (tmp_path / "weights").mkdir()
    assert run_model(str(tmp_path / "weights"), tmp_path) == 2
    assert "has no config.json; is it a model folder?" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_cached_hub_model_loads_when_the_hub_is_unreachable(offline_hub, tiny_model_dir,
                                                              tmp_path) -> None:
    """The fast failure must not cost the cached case: it loads, without retries."""
    import torch
    from huggingface_hub import constants

    from hftlab.config import ModelConfig
    from hftlab.model import load_model, load_tokenizer, model_shape

    repo = Path(constants.HF_HUB_CACHE) / "models--cached-org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    start = time.monotonic()
    assert model_shape("cached-org/tiny").context == 1024
    assert load_tokenizer("cached-org/tiny", ModelConfig()).pad_token_id is not None
    assert isinstance(load_model("cached-org/tiny", ModelConfig(), torch.device("cpu")),
                      torch.nn.Module)
    assert time.monotonic() - start < 15
    assert len(offline_hub) == 1  # asked once, then the cache only


# ---------------------------------------------------------------------------------- sweeps

SWEEPS = [
    ("config: c.yaml\ngrid: {seed: [0, 1]}\ngrid: {seed: [2]}\n",
     "s.yaml:3: key 'grid' is given twice in one mapping (also on line 2)"),
    ("config: c.yaml\ngrid:\n  seed: [0]\n  seed: [1]\n", "s.yaml:4: key 'seed' is given twice"),
    ("", "sweep file {path} is empty"),
    ("# a sweep, one day\n", "sweep file {path} is empty"),
    ("config: c.yaml\ngrid: {seed: [0, 1}\n", "s.yaml:2:19: not valid YAML: expected ',' or "
     "']', but got '}'"),
    ("config: c.yaml\ngrid: {alignment.train.lr: [.inf]}\n",
     "'alignment.train.lr' must be a finite number > 0, got inf"),
    ("config: c.yaml\ngrid: {eval.max_new_tokens: [0]}\n",
     "'eval.max_new_tokens' must be a whole number ≥ 1"),
]


@pytest.mark.parametrize(("text", "message"), SWEEPS,
                         ids=["duplicate-grid", "duplicate-grid-key", "empty", "comments-only",
                              "bad-yaml", "lr-inf", "max-new-tokens-zero"])
def test_a_bad_sweep_file_is_one_line(text: str, message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    path = tmp_path / "s.yaml"
    # a sweep that gets as far as its runs writes to out: keep that in the test's folder
    path.write_text(text + f"out: {tmp_path / 'sweep-out'}\n" if "grid" in text else text)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = one_error_line(capsys)
    assert message.replace("{path}", str(path)) in err
    assert not (tmp_path / "sweep-out").exists()


def test_a_sweep_whose_out_is_a_file_runs_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"config: c.yaml\ngrid: {{seed: [0]}}\nout: {taken}\n")
    assert main(["sweep", str(path)]) == 2
    assert f"{path}: out {taken} is a file, not a folder" in one_error_line(capsys)
    assert taken.read_text() == "mine\n"
