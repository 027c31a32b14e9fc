"""Cache entries (aligned and fine-tuned models, evaluations): verified when read, rebuilt when
damaged or gone, never shared with a run folder through hard links, never left half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hftlab.cache import (
    MANIFEST,
    commit_entry,
    entry_lock,
    usable_entry,
    verify_entry,
    write_manifest,
)
from hftlab.pipeline import STAGES, run_pipeline


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "stages"}


def stage_info(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())


def first_file(folder: Path, suffix: str) -> Path:
    return next(p for p in sorted(folder.rglob(f"*{suffix}")) if p.is_file())


@pytest.fixture
def finished(tiny_config, tmp_path) -> tuple[Path, dict]:
    run = tmp_path / "run"
    return run, run_pipeline(tiny_config, run)


def unfinish(run: Path, first: str) -> None:
    """Remove the stages from ``first`` on, as a run killed before ``first`` would have left."""
    for stage in STAGES[STAGES.index(first):]:
        shutil.rmtree(run / stage, ignore_errors=True)
    (run / "metrics.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- damaged entries

def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_delete],
                         ids=["truncated", "bit-flip", "deleted-file"])
@pytest.mark.parametrize("entry", ["align", "finetune"])
def test_a_damaged_cached_model_is_rebuilt_not_used(entry, damage, finished, tiny_config,
                                                     tmp_path, caplog) -> None:
    run, metrics = finished
    cache = Path(stage_info(run, entry)["cache"])
    damage(first_file(cache / "model", ".safetensors"))
    other = tmp_path / "other"
    again = run_pipeline(tiny_config, other)  # a second run that would reuse the entry
    assert "is damaged" in caplog.text
    assert stage_info(other, entry)["cached"] is False
    assert comparable(again) == comparable(metrics)
    assert verify_entry(cache) is None


def test_a_damaged_evaluation_is_rebuilt(finished, tiny_config, tmp_path, caplog) -> None:
    run, metrics = finished
    align_cache = Path(stage_info(run, "align")["cache"])
    completions = first_file(align_cache / "eval", "completions.jsonl")
    completions.write_text("")
    again = run_pipeline(tiny_config, tmp_path / "other")
    assert "is damaged" in caplog.text
    assert comparable(again) == comparable(metrics)


@pytest.mark.parametrize("entry,resume_at", [("align", "finetune"), ("align", "eval"),
                                              ("finetune", "post_finetune"),
                                              ("finetune", "eval")])
def test_a_deleted_entry_under_a_half_finished_run_is_redone(entry, resume_at, finished,
                                                            tiny_config, caplog) -> None:
    run, metrics = finished
    unfinish(run, resume_at)
    shutil.rmtree(stage_info(run, entry)["cache"])
    resumed = run_pipeline(tiny_config, run)
    assert "which is missing: redoing" in caplog.text
    assert comparable(resumed) == comparable(metrics)


def test_a_finished_run_needs_no_cache(finished, tiny_config) -> None:
    run, metrics = finished
    shutil.rmtree(Path(stage_info(run, "align")["cache"]).parent.parent)
    assert comparable(run_pipeline(tiny_config, run)) == comparable(metrics)


def test_run_folders_hold_copies_not_links(finished, tiny_config, tmp_path) -> None:
    run, _ = finished
    other = tmp_path / "other"
    run_pipeline(tiny_config, other)  # its fine-tuning comes from the cache
    assert stage_info(other, "finetune")["cached"] is True
    cache = Path(stage_info(other, "finetune")["cache"])
    for folder in (run, other):
        for path in (folder / "finetune").rglob("*"):
            if path.is_file():
                assert path.stat().st_nlink == 1, path
    damage_truncate(first_file(other / "finetune" / "model", ".safetensors"))
    assert verify_entry(cache) is None


def test_an_interrupted_cache_write_is_cleaned_up(finished, tiny_config, tmp_path) -> None:
    run, metrics = finished
    cache = Path(stage_info(run, "align")["cache"])
    stale = cache.with_name(f".{cache.name}.x1y2z3")
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "adapter_model.safetensors").write_bytes(b"half")
    run_pipeline(tiny_config, tmp_path / "other")
    assert not stale.exists()


def test_the_cache_entries_of_a_run_have_manifests(finished) -> None:
    run, _ = finished
    for stage in ("align", "finetune"):
        cache = Path(stage_info(run, stage)["cache"])
        assert (cache / MANIFEST).is_file() and verify_entry(cache) is None
        evaluations = [e for e in (cache / "eval").iterdir() if e.is_dir()]
        assert evaluations
        for evaluation in evaluations:
            assert verify_entry(evaluation) is None


# ---------------------------------------------------------------------- entries, one by one

def make_entry(tmp_path: Path) -> Path:
    target = tmp_path / "entry"
    with commit_entry(target) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(b"0123456789")
        (tmp / "meta.json").write_text("{}")
    return target


@pytest.mark.parametrize("change,problem", [
    (lambda e: (e / "model" / "weights.bin").write_bytes(b"01234"), "has 5 bytes"),
    (lambda e: (e / "model" / "weights.bin").write_bytes(b"0123456780"), "SHA-256"),
    (lambda e: (e / "model" / "weights.bin").unlink(), "is missing"),
    (lambda e: (e / "model" / "extra.bin").write_bytes(b"x"), "not in its manifest"),
    (lambda e: (e / MANIFEST).write_text("{not json"), "unreadable"),
    (lambda e: (e / MANIFEST).write_text('{"format": 1}'), "unreadable"),
    (lambda e: shutil.rmtree(e), "missing"),
], ids=["size", "content", "missing-file", "extra-file", "bad-manifest", "manifest-no-files",
        "entry-gone"])
def test_verify_entry_names_the_problem(change, problem, tmp_path) -> None:
    entry = make_entry(tmp_path)
    assert verify_entry(entry) is None
    change(entry)
    assert problem in verify_entry(entry)


def test_a_damaged_entry_is_discarded_for_rebuilding(tmp_path, caplog) -> None:
    entry = make_entry(tmp_path)
    (entry / "model" / "weights.bin").write_bytes(b"xx")
    assert usable_entry(entry) is False
    assert not entry.exists() and "is damaged" in caplog.text


def test_an_entry_from_an_older_version_gets_its_manifest_once(tmp_path) -> None:
    entry = make_entry(tmp_path)
    (entry / MANIFEST).unlink()
    assert verify_entry(entry) is None and (entry / MANIFEST).is_file()
    (entry / "model" / "weights.bin").write_bytes(b"changed!!!")
    assert "SHA-256" in verify_entry(entry)


def test_nested_evaluations_are_not_part_of_the_parent_entry(tmp_path) -> None:
    entry = make_entry(tmp_path)
    with commit_entry(entry / "eval" / "abc") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert verify_entry(entry) is None and verify_entry(entry / "eval" / "abc") is None


def test_a_failed_commit_leaves_no_entry_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError), commit_entry(target) as tmp:
        (tmp / "meta.json").write_text("{}")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_write_manifest_skips_nested_entries(tmp_path) -> None:
    (tmp_path / "eval" / "x").mkdir(parents=True)
    (tmp_path / "eval" / "x" / "metrics.json").write_text("{}")
    (tmp_path / "meta.json").write_text("{}")
    write_manifest(tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert list(files) == ["meta.json"]


def test_the_lock_removes_temporaries_only_of_its_entry(tmp_path) -> None:
    mine = tmp_path / ".entry.abc"
    theirs = tmp_path / ".other.abc"
    mine.mkdir()
    theirs.mkdir()
    with entry_lock(tmp_path / "entry"):
        pass
    assert not mine.exists() and theirs.exists()



def test_a_damaged_gguf_conversion_is_redone(monkeypatch, tmp_path, caplog) -> None:
    import hftlab.model as model_module

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_convert(source: Path, target: Path) -> None:
        conversions.append(source)
        with commit_entry(target) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"\0" * 64)

    monkeypatch.setattr(model_module, "_convert", fake_convert)
    target = model_module.convert_gguf(gguf, tmp_path / "cache")
    assert model_module.convert_gguf(gguf, tmp_path / "cache") == target
    assert len(conversions) == 1  # the second load reuses the verified folder
    (target / "model.safetensors").write_bytes(b"\0" * 10)  # truncated by a crash or a user
    with caplog.at_level("WARNING"):
        assert model_module.convert_gguf(gguf, tmp_path / "cache") == target
    assert len(conversions) == 2 and "is damaged" in caplog.text
    assert (target / "model.safetensors").stat().st_size == 64


def test_a_gguf_converts_to_one_folder_wherever_and_whenever_it_was_installed(
        monkeypatch, tmp_path) -> None:
    """The folder's path is part of every cache key: a reinstalled package (new path, new mtime)
    must map to the same folder, so aligned and fine-tuned entries stay reusable; other
    content must not."""
    import os

    import hftlab.model as model_module

    def fake_convert(source: Path, target: Path) -> None:
        with commit_entry(target) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(model_module, "_convert", fake_convert)
    first, reinstalled, other = (tmp_path / d / "m.gguf" for d in ("a", "b", "c"))
    for path, content in ((first, b"GGUF-1"), (reinstalled, b"GGUF-1"), (other, b"GGUF-2")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(reinstalled, ns=(1, 1))
    cache = tmp_path / "cache"
    target = model_module.convert_gguf(first, cache)
    assert model_module.convert_gguf(reinstalled, cache) == target
    assert model_module.convert_gguf(other, cache) != target
