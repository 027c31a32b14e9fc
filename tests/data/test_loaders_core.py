"""Tests for hftlab.data.loaders.core: registry, source checks, slicing, paths, fingerprint."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from loader_helpers import load, numbers_file, write_jsonl

from hftlab.data import loaders
from hftlab.data.loaders import (
    LOADERS,
    data_fingerprint,
    load_examples,
    register_loader,
    resolve_path,
)
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

# ---------------------------------------------------------------------------------------------
# load_examples: registry, source checks, slicing
# ---------------------------------------------------------------------------------------------


class TestLoadExamples:
    def test_unknown_kind_lists_known(self) -> None:
        with pytest.raises(DataError, match=r"unknown data kind 'nope'; known kinds: .*advbench"):
            load_examples(DataSpec(kind="nope", path="x"))

    def test_all_kinds_registered(self) -> None:
        assert {"beavertails", "refusal", "advbench", "harmful_instructions", "sst2", "ag_news",
                "gsm8k", "demo_refusal", "demo_harmful_qa", "demo_harmful_prompts",
                "demo_sentiment", "demo_harmless"} <= set(LOADERS)

    def test_source_required_exactly_once(self) -> None:
        with pytest.raises(DataError, match=r"needs a source: set path: .* or hub:"):
            load_examples(DataSpec(kind="gsm8k"))
        with pytest.raises(DataError, match=r"both path .* and hub .* keep exactly one"):
            load_examples(DataSpec(kind="gsm8k", path="a.jsonl", hub="gsm8k"))

    def test_unknown_option(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match=r"'beavertails': unknown option\(s\) harmfull_only; "
                           r"accepted options: config, harmful_only, require_response"):
            load("beavertails", numbers_file(tmp_path), options={"harmfull_only": False})
        with pytest.raises(DataError, match="option 'harmful_only' must be true or false"):
            load("beavertails", numbers_file(tmp_path), options={"harmful_only": "no"})

    def test_offset_n_slicing(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        assert [e.label for e in load("gsm8k", path)] == ["0", "1", "2", "3", "4"]
        ex = load("gsm8k", path, offset=1, n=3)
        assert [(e.label, e.row) for e in ex] == [("1", 1), ("2", 2), ("3", 3)]
        assert [e.label for e in load("gsm8k", path, offset=3)] == ["3", "4"]
        assert [e.label for e in load("gsm8k", path, offset=0, n=5)] == ["0", "1", "2", "3", "4"]

    def test_slicing_after_filtering(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "bt.jsonl", [
            {"prompt": f"p{i}", "response": "r", "is_safe": i % 2 == 0} for i in range(6)])
        ex = load("beavertails", path, offset=1, n=2)
        assert [(e.prompt, e.row) for e in ex] == [("p3", 3), ("p5", 5)]
        with pytest.raises(DataError, match=r"bt\.jsonl has only 3 usable rows \(after "
                           r"filtering\); the config asks for offset=1, n=3: lower n/offset"):
            load("beavertails", path, offset=1, n=3)

    def test_n_too_large(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        with pytest.raises(DataError, match=r"g\.jsonl has only 5 usable rows .* offset=2, n=4: "
                           r"lower n/offset or use a larger file"):
            load("gsm8k", path, offset=2, n=4)
        with pytest.raises(DataError, match=r"has only 5 usable rows .* offset=5, n=all"):
            load("gsm8k", path, offset=5)

    def test_bad_window(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        with pytest.raises(DataError, match="offset must be an integer >= 0"):
            load("gsm8k", path, offset=-1)
        with pytest.raises(DataError, match="n must be an integer >= 1"):
            load("gsm8k", path, n=0)

    def test_empty_file(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.jsonl"
        path.write_text("\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"empty\.jsonl has only 0 usable rows"):
            load("gsm8k", path)

    def test_unsupported_suffix(self, tmp_path: Path) -> None:
        path = tmp_path / "data.txt"
        path.write_text("x", encoding="utf-8")
        with pytest.raises(DataError, match=r"data\.txt: unsupported file type; expected one of"):
            load("gsm8k", path)

    def test_custom_loader_gets_source(self) -> None:
        @register_loader("test_custom_kind")
        def custom(spec: DataSpec, data_root: Path | None) -> list[Example]:
            return [Example(prompt=str(i), row=i) for i in range(3)]

        try:
            ex = load_examples(DataSpec(kind="test_custom_kind", hub="x/y", n=2))
            assert [(e.prompt, e.source) for e in ex] == [("0", "hub:x/y"), ("1", "hub:x/y")]
        finally:
            del LOADERS["test_custom_kind"]


# ---------------------------------------------------------------------------------------------
# resolve_path
# ---------------------------------------------------------------------------------------------


class TestResolvePath:
    def test_cwd_then_data_root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cwd, root = tmp_path / "cwd", tmp_path / "root"
        (cwd / "sub").mkdir(parents=True)
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f.jsonl").write_text("{}\n")
        monkeypatch.chdir(cwd)
        assert resolve_path("sub/f.jsonl", root) == root / "sub" / "f.jsonl"
        (cwd / "sub" / "f.jsonl").write_text("{}\n")
        assert resolve_path("sub/f.jsonl", root) == cwd / "sub" / "f.jsonl"
        assert resolve_path(str(root / "sub" / "f.jsonl"), None) == root / "sub" / "f.jsonl"

    def test_not_found_lists_tried(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("HFTLAB_DATA_ROOT", raising=False)
        root = tmp_path / "root"
        with pytest.raises(DataError) as info:
            resolve_path("gsm8k/train.jsonl", root)
        msg = str(info.value)
        assert "'gsm8k/train.jsonl' not found" in msg
        assert str(tmp_path / "gsm8k" / "train.jsonl") in msg
        assert str(root / "gsm8k" / "train.jsonl") in msg
        assert "set --data-root, HFTLAB_DATA_ROOT or the config's data_root" in msg
        with pytest.raises(DataError, match=r"data_root is not set"):
            resolve_path("gsm8k/train.jsonl", None)
        with pytest.raises(DataError, match="not found"):
            resolve_path(str(tmp_path / "absent.jsonl"), root)
        with pytest.raises(DataError, match="resolves to a directory"):
            resolve_path(".", None)

    def test_load_examples_uses_data_root(self, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        root = tmp_path / "root"
        root.mkdir()
        numbers_file(root, 2)
        monkeypatch.chdir(tmp_path)
        ex = load_examples(DataSpec(kind="gsm8k", path="g.jsonl"), data_root=root)
        assert ex[0].source == str(root / "g.jsonl")
        with pytest.raises(DataError, match="not found"):
            load_examples(DataSpec(kind="gsm8k", path="g.jsonl"))


# ---------------------------------------------------------------------------------------------
# data_fingerprint
# ---------------------------------------------------------------------------------------------


class TestFingerprint:
    def test_stable_and_sensitive(self) -> None:
        base = [Example(prompt="p", response="r", is_harmful=True, label=None),
                Example(prompt="q", response="s", label="x")]
        fp = data_fingerprint(base)
        assert len(fp) == 64
        assert int(fp, 16) >= 0
        same = [Example(prompt="p", response="r", is_harmful=True, source="elsewhere", row=7,
                        meta={"a": 1}), Example(prompt="q", response="s", label="x")]
        assert data_fingerprint(same) == fp
        variants = [
            [Example(prompt="p ", response="r", is_harmful=True), base[1]],
            [Example(prompt="p", response="R", is_harmful=True), base[1]],
            [Example(prompt="p", response="r", is_harmful=False), base[1]],
            [Example(prompt="p", response="r", is_harmful=True, label=""), base[1]],
            [base[1], base[0]],
            base[:1],
        ]
        fps = {data_fingerprint(v) for v in variants}
        assert fp not in fps
        assert len(fps) == len(variants)
        assert data_fingerprint([]) != fp


# ---------------------------------------------------------------------------------------------
# The package: public names and kind registration on import
# ---------------------------------------------------------------------------------------------

PUBLIC_NAMES = [
    "AG_NEWS_LABELS", "LOADERS", "Loader", "data_fingerprint", "demo_dir", "gsm8k_final_answer",
    "hub_rows", "load_ag_news", "load_advbench", "load_beavertails", "load_demo_harmful_prompts",
    "load_demo_harmful_qa", "load_demo_harmless", "load_demo_refusal", "load_demo_sentiment",
    "load_examples", "load_gsm8k", "load_harmful_instructions", "load_refusal", "load_sst2",
    "map_ag_news", "map_beavertails", "map_gsm8k", "map_refusal", "map_sst2", "register_loader",
    "resolve_path",
]


class TestPackage:
    def test_public_names_importable(self) -> None:
        assert set(PUBLIC_NAMES) <= set(loaders.__all__)
        for name in loaders.__all__:
            assert getattr(loaders, name) is not None, name
        assert loaders.LOADERS is importlib.import_module("hftlab.data.loaders.core").LOADERS

    def test_kinds_registered_in_order(self) -> None:
        builtin = [k for k in LOADERS if k != "test_custom_kind"]
        assert builtin[:12] == [
            "beavertails", "refusal", "advbench", "harmful_instructions", "sst2", "ag_news",
            "gsm8k", "demo_refusal", "demo_harmful_qa", "demo_harmful_prompts", "demo_sentiment",
            "demo_harmless"]
        assert LOADERS["sst2"] is loaders.load_sst2
        assert LOADERS["demo_harmless"] is loaders.load_demo_harmless

    def test_demo_dir_is_the_shipped_pack(self) -> None:
        assert loaders.demo_dir() == Path(loaders.__file__).parents[1] / "demo"
