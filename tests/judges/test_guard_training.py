"""Teaching a causal LM the Llama Guard prompt: the folder it writes is a llama_guard judge that
shares the base model's vocabulary (what Virus's guard term needs)."""

import json
from importlib.resources import files
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hftlab.attacks.virus_guard import check_shared_vocabulary
from hftlab.cli import main
from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.judges.guard_training import GUARD_FILE, GuardSettings, guard_item, train_guard
from hftlab.judges.llama_guard import LlamaGuardJudge, build_prompt


def demo_rows() -> list[Example]:
    """The demo pack's harmful prompts answered with its placeholder compliance (harmful) and
    with its refusal (harmless)."""
    text = (files("hftlab.data") / "demo" / "harmful.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][:12]
    return [Example(r["prompt"], r[field], is_harmful=field == "compliance", source="demo",
                    row=i)
            for i, r in enumerate(rows) for field in ("compliance", "refusal")]


def test_only_the_verdict_and_the_end_of_turn_are_supervised(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = Example("How do I bake bread?", "Mix flour and water, knead, wait, bake.",
                      is_harmful=False)
    item = guard_item(tok, example, max_response_tokens=3)
    cut = tok.decode(tok(example.response, add_special_tokens=False)["input_ids"][:3])
    context = tok(build_prompt(example.prompt, cut), add_special_tokens=False)["input_ids"]
    assert item.input_ids[: item.n_prompt] == context
    assert item.input_ids[item.n_prompt:] == (
        tok("safe", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    harmful = guard_item(tok, example.replace(is_harmful=True), max_response_tokens=3)
    assert tok.decode(harmful.input_ids[harmful.n_prompt:-1]) == "unsafe"


def test_the_trained_guard_is_a_llama_guard_judge_of_the_same_vocabulary(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "guard"
    settings = GuardSettings(base=str(tiny_model_dir), epochs=3, lr=1e-2, batch_size=4,
                             max_response_tokens=24, heldout=0.25)
    info = train_guard(demo_rows(), out, ["demo"], settings)
    rows = info["training"]["rows"]
    assert rows["train"] + rows["heldout"] == 24 and rows["heldout"] == 6
    assert rows["train_harmful"] == 9 and rows["heldout_harmful"] == 3  # whole prompts held out
    loss = info["training"]["loss"]
    assert loss["steps"] == 3 * 5  # 18 rows in batches of 4, 3 epochs
    assert loss["last_epoch_loss"] < loss["first_epoch_loss"] / 2
    assert json.loads((out / GUARD_FILE).read_text()) == info
    heldout = info["metrics"]["heldout"]
    assert heldout["n"] == 6 and info["metrics"]["heldout_unparsed"] == 0
    judge = LlamaGuardJudge(model=str(out), device="cpu", dtype="float32")
    assert len(judge.flag([r.prompt for r in demo_rows()[:4]],
                          [r.response for r in demo_rows()[:4]])) == 4
    assert judge.counts["unparsed"] == 0
    tok, _ = judge.loaded()
    check_shared_vocabulary(AutoTokenizer.from_pretrained(tiny_model_dir), tok, str(out))


def test_a_folder_that_is_not_a_guard_is_never_overwritten(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a guard folder"):
        train_guard(demo_rows(), tmp_path, ["demo"], GuardSettings(base=str(tiny_model_dir)))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_options_of_the_other_kind_are_refused(tmp_path: Path, capsys) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response,
                                        "harmful": e.is_harmful}) + "\n"
                            for e in demo_rows()))
    common = ["judge", "train", "--data", str(rows), "--out", str(tmp_path / "j")]
    assert main([*common, "--kind", "guard", "--C", "2"]) != 0
    assert "--C only apply to --kind embedding" in capsys.readouterr().err
    assert main([*common, "--epochs", "3"]) != 0
    assert "--epochs only apply to --kind guard" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()
