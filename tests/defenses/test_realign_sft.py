"""Re-alignment SFT trains the user's adapter (or the full weights) for exactly ``steps``
optimizer steps on the provider's alignment rows and nothing else: the first step equals a hand
AdamW step on the cross-entropy of the alignment batch, the frozen base never moves, and the
run's own defense hooks are not called."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from defense_helpers import PAD_ID, autograd_of, run_tiny_pipeline, token_items
from torch.optim.optimizer import register_optimizer_step_post_hook

from hftlab.config import ConfigError, TrainConfig
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES
from hftlab.model import is_peft
from hftlab.train import collate, supervised_loss


class RecordingContext:
    """The run context realign_sft reads: alignment and user rows, tokenised on request (each
    request recorded), the alignment stage's TrainConfig and a CPU accelerator."""

    def __init__(self, alignment_items, user_items, **train) -> None:
        from accelerate import Accelerator

        self.data = SimpleNamespace(alignment=[Example("a", "r")] * len(alignment_items),
                                    user=[Example("u", "r")] * len(user_items))
        self._items = {id(self.data.alignment): alignment_items, id(self.data.user): user_items}
        self.tokenized: list[int] = []
        align = TrainConfig(lr=1e-2, batch_size=8, max_grad_norm=0.0, **train)
        self.config = SimpleNamespace(
            seed=0,
            alignment=SimpleNamespace(train=align),
            finetune=SimpleNamespace(train=TrainConfig(lr=1e-5, batch_size=1)),
        )
        self.accelerator = Accelerator(cpu=True)
        self.tokenizer = SimpleNamespace(pad_token_id=PAD_ID)
        self.precision = "fp32"

    def tokenize(self, examples, max_length):
        self.tokenized.append(id(examples))
        return self._items[id(examples)]


def frozen_lora(model: torch.nn.Module) -> torch.nn.Module:
    """As PeftModel.from_pretrained loads the fine-tuning adapter: nothing trainable."""
    model.requires_grad_(False)
    return model


def test_first_step_is_adamw_on_alignment_cross_entropy(tiny_lora) -> None:
    alignment = token_items(6, seed=11)  # one batch: batch_size 8 ≥ 6 rows
    ctx = RecordingContext(alignment, token_items(6, seed=12))
    model = frozen_lora(tiny_lora)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    for p in lora.values():
        p.requires_grad_(True)
    grads = autograd_of(model, supervised_loss(model, collate(alignment, PAD_ID)))
    model.requires_grad_(False)

    out = DEFENSES.get("realign_sft")(steps=1).post_finetune(model, ctx)
    lr, eps = 1e-2, 1e-8  # the alignment stage's lr; AdamW's eps
    # AdamW, first step, no weight decay: m̂ = g, v̂ = g², w ← w − lr · g / (|g| + eps)
    for name, p in out.named_parameters():
        if name in lora:
            expected = before[name] - lr * grads[name] / (grads[name].abs() + eps)
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_trains_exactly_steps_on_alignment_rows_and_only_the_adapter(tiny_lora) -> None:
    alignment, user = token_items(6, seed=11), token_items(6, seed=12)
    ctx = RecordingContext(alignment, user)
    model = frozen_lora(tiny_lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen_rows: list[list[int]] = []

    def record(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen_rows.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))

    optimizer_steps = []
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: optimizer_steps.append(1))
    body = model.get_base_model().model
    handle = body.register_forward_pre_hook(record, with_kwargs=True)
    defense = DEFENSES.get("realign_sft")(steps=5, batch_size=2)
    try:
        out = defense.post_finetune(model, ctx)
    finally:
        handle.remove()
        hook.remove()
    assert len(optimizer_steps) == 5
    assert ctx.tokenized == [id(ctx.data.alignment)]  # the user's rows are never read
    alignment_rows = [item.input_ids for item in alignment]
    assert len(seen_rows) == 5 * 2 and all(row in alignment_rows for row in seen_rows)
    assert is_peft(out)
    for name, p in out.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"{name} (frozen base) moved"
    report = defense.report("post_finetune")
    assert report["steps"] == 5 and report["batch_size"] == 2 and report["rows"] == 6
    assert report["lr"] == 1e-2 and report["trained"] == "adapter"
    assert math.isfinite(report["loss_first"]) and math.isfinite(report["loss_last"])
    assert defense.report("finetune") == {}


def test_full_finetuning_trains_every_weight(tiny_lora) -> None:
    plain = tiny_lora.merge_and_unload().to(torch.bfloat16)  # as loaded on a bf16 run
    plain.requires_grad_(False)
    before = {n: p.detach().float().clone() for n, p in plain.named_parameters()}
    ctx = RecordingContext(token_items(6, seed=11), [])
    defense = DEFENSES.get("realign_sft")(steps=2, lr=1e-3)
    out = defense.post_finetune(plain, ctx)
    assert not is_peft(out)
    assert all(p.dtype == torch.float32 for p in out.parameters())  # fp32 master weights
    moved = [n for n, p in out.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    assert "model.layers.1.post_attention_layernorm.weight" in moved
    report = defense.report("post_finetune")
    assert report["trained"] == "full" and report["steps"] == 2 and report["lr"] == 1e-3


def test_the_runs_own_defense_is_not_called(tiny_lora, monkeypatch) -> None:
    calls = []
    sft = DEFENSES.get("sft")
    monkeypatch.setattr(sft, "setup", lambda self, stage, trainer: calls.append(stage))
    ctx = RecordingContext(token_items(4, seed=11), [])
    ctx.defense = DEFENSES.get("lisa")()  # the run's defense: its hooks must stay unused
    for hook in ("setup", "training_step", "loss"):
        monkeypatch.setattr(DEFENSES.get("lisa"), hook,
                            lambda *args, **kwargs: pytest.fail("run's defense hook called"))
    DEFENSES.get("realign_sft")(steps=1).post_finetune(frozen_lora(tiny_lora), ctx)
    assert calls == ["post_finetune"]  # a plain sft defense drove the trainer


def test_train_config_derives_from_alignment() -> None:
    align = TrainConfig(lr=3e-4, batch_size=6, grad_accum=2, max_steps=None, epochs=5,
                        weight_decay=0.1, schedule="cosine", max_length=99)
    cfg = DEFENSES.get("realign_sft")().train_config(align)
    assert cfg == dataclasses.replace(align, max_steps=20)
    cfg = DEFENSES.get("realign_sft")(steps=3, lr=1e-4, batch_size=2).train_config(align)
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.grad_accum) == (3, 1e-4, 2, 2)


def test_realign_sft_defaults_and_validation() -> None:
    defense = DEFENSES.get("realign_sft")()
    # a baseline without a reference implementation: 20 steps, the alignment stage's lr and
    # batch size (None = take alignment.train's)
    assert defense.options.steps == 20
    assert defense.options.lr is None and defense.options.batch_size is None
    assert defense.stages == ("post_finetune",) and defense.needs_alignment_data
    assert defense.cache_key("alignment") is None
    for bad in ({"steps": 0}, {"lr": 0.0}, {"lr": -1e-4}, {"batch_size": 0},
                {"epochs": 1}):
        with pytest.raises(ConfigError):
            DEFENSES.get("realign_sft")(**bad)


def test_realign_sft_needs_alignment_rows(tiny_lora) -> None:
    ctx = RecordingContext([], [])
    with pytest.raises(ConfigError, match="alignment"):
        DEFENSES.get("realign_sft")().post_finetune(tiny_lora, ctx)


def test_realign_sft_end_to_end(tiny_overrides, tmp_path) -> None:
    metrics = run_tiny_pipeline(tiny_overrides, tmp_path, "defense=realign_sft",
                                "defense_args={steps: 2}")
    repair = metrics["repair"]
    assert repair is not None
    assert math.isfinite(repair["harmful_score_change"])
    assert math.isfinite(repair["finetune_accuracy_change"])
    report = repair["report"]
    assert report["steps"] == 2 and report["trained"] == "adapter"
    assert report["batch_size"] == 4  # alignment.train.batch_size of the tiny config
    assert math.isfinite(report["loss_first"]) and math.isfinite(report["loss_last"])
