"""Antidote zeroes, in every output row, exactly the top-scored fraction of the Wanda score
|W_ij|·‖X_j‖₂, with X the layer's inputs over the provider's harmful rows: checked by hand on
fixed tensors and on the tiny model's LoRA factors (A scored with the layer input X, B with A·X)
and full weights, activations recorded one row at a time as the reference does. The fine-tuning
stage trains the reference's rank-256 adapter (r 256, α 4 on q, k, v) unless told otherwise."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import PAD_ID, run_tiny_pipeline, stage_info, token_items

from hftlab.config import ConfigError, LoraConfig, TrainConfig
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES
from hftlab.defenses.antidote import wanda_mask
from hftlab.defenses.weights import lora_layers


def fake_ctx(items):
    """What Antidote reads from the run context: the provider's harmful rows, tokenised."""
    return SimpleNamespace(
        data=SimpleNamespace(provider_harmful=[Example("p", "r", True)] * len(items)),
        tokenize=lambda examples, max_length: items[: len(examples)],
        tokenizer=SimpleNamespace(pad_token_id=PAD_ID),
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        config=SimpleNamespace(finetune=SimpleNamespace(train=SimpleNamespace(max_length=64))),
    )


def hand_pruned(weight: torch.Tensor, norms: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """``weight`` with, in each row, the ``n_pruned`` largest |W_ij|·norm_j set to zero (ties:
    the later column counts as larger, as in a stable ascending sort)."""
    out = weight.clone()
    w, n = weight.tolist(), norms.tolist()
    for i, row in enumerate(w):
        order = sorted(range(len(row)), key=lambda j: (abs(row[j]) * n[j], j))
        for j in order[len(row) - n_pruned:]:
            out[i, j] = 0.0
    return out


def recorded_inputs(module: torch.nn.Module, model: torch.nn.Module, items) -> torch.Tensor:
    """Every token's input to ``module``, the rows run one at a time without padding."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach()))
    with torch.no_grad():
        for item in items:
            model(input_ids=torch.tensor([item.input_ids]))
    handle.remove()
    return torch.cat(seen)


def test_wanda_mask_zeroes_top_scores_per_row() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 10)
    weight[1, 2], weight[1, 7] = 5.0, -5.0  # a tie in row 1 (equal norms below)
    norms = torch.rand(10) + 0.1
    norms[2] = norms[7] = 1.0
    mask = wanda_mask(weight, norms, 0.3)  # keep int(10 · 0.7) = 7, prune 3 per row
    assert mask.sum(dim=1).tolist() == [3, 3, 3]
    assert torch.equal(weight.masked_fill(mask, 0), hand_pruned(weight, norms, 3))
    # the reference default 0.1 on 32 columns keeps int(28.8) = 28: 4 pruned per row
    assert wanda_mask(torch.randn(5, 32), torch.ones(32), 0.1).sum(dim=1).tolist() == [4] * 5


def test_wanda_mask_on_rank_256_keeps_230_columns_per_row_of_b() -> None:
    torch.manual_seed(4)
    b = torch.randn(6, 256)  # lora_B [out × r] of the reference's rank-256 adapter
    norms = torch.rand(256) + 0.05  # ‖(A·X)_j‖₂ per rank direction
    mask = wanda_mask(b, norms, 0.1)
    keep = int(256 * 0.9)  # int(230.4) = 230 kept, 26 pruned per row (10.2 %)
    assert keep == 230
    assert mask.sum(dim=1).tolist() == [256 - keep] * 6
    assert torch.equal(b.masked_fill(mask, 0), hand_pruned(b, norms, 256 - keep))
    # the kept entries of each row are its 230 lowest scores
    score = b.abs() * norms
    for row in range(6):
        assert score[row][~mask[row]].max() <= score[row][mask[row]].min()
    # rank 8 (the run's old adapter) keeps int(7.2) = 7: every row loses its top entry
    assert wanda_mask(torch.randn(6, 8), torch.ones(8), 0.1).sum(dim=1).tolist() == [1] * 6


def test_antidote_prunes_lora_factors_with_their_own_inputs(tiny_lora) -> None:
    items = token_items(11, seed=3)  # two padded calibration batches
    before = copy.deepcopy(tiny_lora)
    defense = DEFENSES.get("antidote")()
    repaired = defense.post_finetune(tiny_lora, fake_ctx(items))
    assert repaired is tiny_lora

    layers_before, layers_after = lora_layers(before), lora_layers(repaired)
    for name in ("model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        layer = layers_before[name]
        a = layer.lora_A["default"].weight.detach()
        b = layer.lora_B["default"].weight.detach()
        x = recorded_inputs(layer, before, items)  # the LoRA layer's input X = lora_A's input
        norm_a = x.pow(2).sum(0).sqrt()
        norm_b = (x @ a.T).pow(2).sum(0).sqrt()  # lora_B's input is A·X (scale comes after B)
        cut_a = a.shape[1] - int(a.shape[1] * 0.9)
        cut_b = b.shape[1] - int(b.shape[1] * 0.9)
        got_a = layers_after[name].lora_A["default"].weight
        got_b = layers_after[name].lora_B["default"].weight
        assert torch.equal(got_a, hand_pruned(a, norm_a, cut_a)), name
        assert torch.equal(got_b, hand_pruned(b, norm_b, cut_b)), name

    zeroed = 0
    for name, layer in layers_after.items():
        for part in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            cols = part.shape[1]
            assert ((part == 0).sum(dim=1) == cols - int(cols * 0.9)).all(), name
            zeroed += int((part == 0).sum())
    untouched = {n: p for n, p in before.named_parameters() if "lora_" not in n}
    for n, p in repaired.named_parameters():
        if n in untouched:
            assert torch.equal(p, untouched[n]), n

    report = defense.report("post_finetune")
    assert report["pruned"] == "lora_factors"
    assert report["weights_zeroed"] == zeroed == sum(report["zeroed_by_part"].values())
    assert report["layers_pruned"] == 2 * len(layers_after)
    assert report["calibration_rows"] == 11
    assert report["calibration_tokens"] == sum(len(i.input_ids) for i in items)
    assert 0.1 <= report["fraction_zeroed"] < 0.3


def test_antidote_full_finetuning_prunes_qkv_weights(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = copy.deepcopy(model)
    items = token_items(6, seed=5)
    defense = DEFENSES.get("antidote")(dense_ratio=0.25, calibration_rows=4)
    defense.post_finetune(model, fake_ctx(items))

    k_proj = before.model.layers[1].self_attn.k_proj
    x = recorded_inputs(k_proj, before, items[:4])
    cols = k_proj.weight.shape[1]
    expected = hand_pruned(k_proj.weight.detach(), x.pow(2).sum(0).sqrt(),
                           cols - int(cols * 0.75))
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, expected)
    changed = {n for (n, p), q in zip(model.named_parameters(), before.parameters())
               if not torch.equal(p, q)}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight"
                       for i in range(len(model.model.layers))
                       for m in ("q_proj", "k_proj", "v_proj")}
    report = defense.report("post_finetune")
    assert report["pruned"] == "full_weights" and report["calibration_rows"] == 4


def test_antidote_modules_option_narrows_the_pruned_layers(tiny_lora) -> None:
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    defense = DEFENSES.get("antidote")(modules=["v_proj"])
    defense.post_finetune(tiny_lora, fake_ctx(token_items(4, seed=7)))
    changed = {n for n, p in tiny_lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("v_proj.lora_" in n for n in changed)
    with pytest.raises(ConfigError, match="no layer"):
        DEFENSES.get("antidote")(modules=["nothing"]).post_finetune(
            tiny_lora, fake_ctx(token_items(4, seed=7)))


def test_antidote_defaults_and_validation() -> None:
    antidote = DEFENSES.get("antidote")()
    # git-disl/Antidote train.py --dense_ratio default 0.1 (script/finetune/
    # antidote_poison_ratio.sh: dense_ratio=0.1, bad_sample_num=2000 calibration rows)
    assert antidote.options.dense_ratio == 0.1
    assert antidote.options.calibration_rows == 2000
    assert antidote.options.modules is None  # every LoRA factor (find_layers: "lora" in name)
    assert antidote.options.finetune_lora == "antidote"  # train.py: r 256, α 4 on q, k, v
    assert antidote.stages == ("post_finetune",) and antidote.needs_provider_harmful
    assert antidote.cache_key("alignment") is None
    for bad in ({"dense_ratio": 0.0}, {"dense_ratio": 1.0}, {"calibration_rows": 0},
                {"modules": []}, {"sparsity": 0.5}):
        with pytest.raises(ConfigError):
            DEFENSES.get("antidote")(**bad)
    with pytest.raises(ConfigError, match="finetune_lora.*reference"):  # lists the presets
        DEFENSES.get("antidote")(finetune_lora="r256")


def test_antidote_finetune_train_swaps_only_the_adapter() -> None:
    run = TrainConfig(lr=3e-4, epochs=2, batch_size=6, weight_decay=0.1, max_length=128,
                      lora=LoraConfig(r=8, alpha=16, dropout=0.05))
    train = DEFENSES.get("antidote")().finetune_train(run)
    assert (train.lora.r, train.lora.alpha, train.lora.dropout) == (256, 4, 0.0)
    assert train.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert train.lora.scale == 4 / 256
    assert train == TrainConfig(lr=3e-4, epochs=2, batch_size=6, weight_decay=0.1,
                                max_length=128, lora=train.lora)
    assert run.lora == LoraConfig(r=8, alpha=16, dropout=0.05)  # the run's config is untouched
    assert DEFENSES.get("antidote")(finetune_lora=None).finetune_train(run) is run
    assert DEFENSES.get("antidote")(finetune_lora="reference").finetune_train(run).lora.r == 32
    full = TrainConfig(method="full")
    assert DEFENSES.get("antidote")().finetune_train(full) is full  # no adapter to set


def test_antidote_reference_settings_pin_the_reference() -> None:
    cls = DEFENSES.get("antidote")
    options = set(cls().options_dict())
    # every key resolves: tests/test_defense_settings.py; here the reference values are pinned
    keys = [s.key for s in cls.reference_settings]
    assert len(keys) == len(set(keys))
    assert all(k.split(".", 1)[1] in options for k in keys if k.startswith("defense_args."))
    settings = {s.key: s.reference for s in cls.reference_settings}
    assert (settings["finetune.train.lora.r"], settings["finetune.train.lora.alpha"]) == (256, 4)
    assert settings["defense_args.dense_ratio"] == cls().options.dense_ratio
    assert settings["defense_args.calibration_rows"] == cls().options.calibration_rows


def test_antidote_end_to_end(tiny_overrides, tmp_path) -> None:
    from hftlab.config import load_config
    from hftlab.context import RunContext
    from hftlab.model import merged
    from hftlab.stage_models import deployed_model, finetuned_model

    extra = ["defense=antidote", "provider_harmful={kind: demo_harmful_qa, n: 16}"]
    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, *extra)
    repair = metrics["repair"]
    assert repair is not None
    for key in ("before.harmful_score", "harmful_score_change", "finetune_accuracy_change"):
        assert math.isfinite(repair[key]), key
    report = repair["report"]
    assert report == stage_info(tmp_path, "post_finetune")["defense_report"]
    assert report["calibration_rows"] == 16 and report["weights_zeroed"] > 0

    ctx = RunContext(load_config(None, [*tiny_overrides, *extra]), tmp_path / "run")
    # the fine-tuning stage trained (and Antidote pruned) the reference's rank-256 q/k/v adapter
    lora = ctx.finetune_train.lora
    assert (lora.r, lora.alpha, lora.dropout) == (256, 4, 0.0)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert ctx.finetune_train.lr == ctx.config.finetune.train.lr
    saved = json.loads((tmp_path / "run" / "finetune" / "model" / "adapter_config.json")
                       .read_text())
    assert (saved["r"], saved["lora_alpha"]) == (256, 4)
    assert sorted(saved["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert report["zeroed_by_part"]["lora_B"] == (256 - int(256 * 0.9)) * sum(
        layer.lora_B["default"].weight.shape[0] for layer in lora_layers(finetuned_model(ctx))
        .values())
    deployed, tuned = deployed_model(ctx), merged(finetuned_model(ctx))
    assert any(not torch.equal(p, q) for p, q in zip(deployed.parameters(), tuned.parameters()))


def test_antidote_finetune_lora_null_keeps_the_runs_adapter(tiny_overrides, tmp_path) -> None:
    from hftlab.config import load_config
    from hftlab.context import RunContext

    base = [*tiny_overrides, "defense=antidote", "provider_harmful={kind: demo_harmful_qa, n: 8}"]
    config = load_config(None, [*base, "defense_args={finetune_lora: null}"])
    ctx = RunContext(config, tmp_path / "run")
    assert ctx.finetune_train == config.finetune.train
    assert ctx.finetune_train.lora.r == 8  # hftlab's default adapter
    preset = RunContext(load_config(None, base), tmp_path / "other")
    assert preset.finetune_key() != ctx.finetune_key()  # the adapter is in the cache key
