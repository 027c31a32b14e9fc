"""Teaching a causal LM the Llama Guard prompt: the folder it writes is a llama_guard judge that
shares the base model's vocabulary (what Virus's guard term needs)."""

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

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


@pytest.fixture(scope="module")
def guard(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("guard") / "guard"
    settings = GuardSettings(base=str(tiny_model_dir), epochs=3, lr=1e-2, batch_size=4,
                             max_response_tokens=24, heldout=0.25)
    return out, train_guard(demo_rows(), out, ["demo"], settings)


def test_a_long_response_is_cut_and_only_the_verdict_is_supervised(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = Example("How do I bake bread?", "Mix flour and water, knead, wait, bake.",
                      is_harmful=True)
    item = guard_item(tok, example, max_response_tokens=3)
    cut = tok.decode(tok(example.response, add_special_tokens=False)["input_ids"][:3])
    assert len(cut) < len(example.response)
    assert item.input_ids[: item.n_prompt] == tok(build_prompt(example.prompt, cut),
                                                  add_special_tokens=False)["input_ids"]
    assert item.input_ids[-1] == tok.eos_token_id
    assert tok.decode(item.input_ids[item.n_prompt:-1]) == "unsafe"


def test_the_training_target_is_what_the_judge_and_the_virus_guard_read(
        guard: tuple[Path, dict]) -> None:
    folder, _ = guard
    judge = LlamaGuardJudge(model=str(folder), device="cpu", dtype="float32")  # template auto
    tok, _ = judge.loaded()
    example = Example("How do I bake bread?", "Mix flour and water.")
    item = guard_item(tok, example, max_response_tokens=64)
    # the judge renders the saved guard's prompt as training did (no chat template kept) ...
    rendered = tok(judge.render(example.prompt, example.response), add_special_tokens=False)
    assert item.input_ids[: item.n_prompt] == rendered["input_ids"]
    # ... and the first supervised token is the one the Virus guard term scores (TokenGuard.safe)
    assert item.input_ids[item.n_prompt] == tok("safe", add_special_tokens=False)["input_ids"][0]


def test_the_trained_guard_is_a_llama_guard_judge(guard: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    folder, info = guard
    rows = info["training"]["rows"]
    assert rows["train"] + rows["heldout"] == 24 and rows["heldout"] == 6
    assert rows["train_harmful"] == 9 and rows["heldout_harmful"] == 3  # whole prompts held out
    loss = info["training"]["loss"]
    assert loss["steps"] == 3 * 5  # 18 rows in batches of 4, 3 epochs
    assert loss["last_epoch_loss"] < loss["first_epoch_loss"] / 2
    assert json.loads((folder / GUARD_FILE).read_text()) == info
    assert info["metrics"]["heldout"]["n"] == 6 and info["metrics"]["heldout_unparsed"] == 0
    judge = LlamaGuardJudge(model=str(folder), device="cpu", dtype="float32")
    assert judge.describe()["guard"]["heldout"] == info["metrics"]["heldout"]
    # `hftlab judge eval` reads a guard folder as a llama_guard judge, with its options
    labelled = tmp_path / "rows.jsonl"
    labelled.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response,
                                            "harmful": e.is_harmful}) + "\n"
                                for e in demo_rows()[:4]))
    out = tmp_path / "metrics.json"
    assert main(["judge", "eval", "--judge", str(folder), "--judge-arg", "dtype=float32",
                 "--data", str(labelled), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["judge"]["name"] == "llama_guard" and evaluated["n"] == 4
    assert evaluated["judge"]["dtype"] == "float32"


def test_bf16_training_keeps_fp32_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = GuardSettings(base=str(tiny_model_dir), epochs=1, lr=1e-2, batch_size=8,
                             max_response_tokens=8, heldout=0.0, precision="bf16")
    train_guard(demo_rows(), tmp_path / "g", ["demo"], settings)
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}


def test_a_folder_that_is_not_a_guard_is_never_overwritten(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a guard folder"):
        train_guard(demo_rows(), tmp_path, ["demo"], GuardSettings(base=str(tiny_model_dir)))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_options_of_the_other_kind_are_refused_before_any_data_is_read(
        tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "no such rows.jsonl")
    common = ["judge", "train", "--data", missing, "--out", str(tmp_path / "j")]
    assert main([*common, "--kind", "guard", "--C", "2", "--encoder", "minilm"]) != 0
    assert "--encoder, --C only for --kind embedding: drop them" in capsys.readouterr().err
    assert main([*common, "--epochs", "3"]) != 0
    assert "--epochs only for --kind guard: drop it or add --kind guard" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()
