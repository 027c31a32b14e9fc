"""Train a Llama-Guard-style guard from a causal LM: the model learns to answer the Llama Guard
prompt of a labelled exchange (:func:`hftlab.judges.llama_guard.build_prompt`) with "safe" or
"unsafe". The folder it writes is a ``llama_guard`` judge (``judge_args.model: FOLDER``).

Why: the Virus attack's guard term (``judge_term: gradient``) back-propagates a guard's "safe"
loss into the virus tokens, so the guard must share the victim's vocabulary (the reference's
Llama Guard 2 shares Llama-3's). No Llama Guard exists for SmolLM2; this trains one on the
provider's own labelled rows, as ``hftlab judge train`` does for the embedding judge.

Every weight is trained (as Llama Guard was, from Llama), on the verdict tokens only (the
prompt is context), and the model is saved with its tokenizer, less its chat template: the guard's
prompt is the builtin one, which the ``llama_guard`` judge then renders (``template: auto``
falls back to it). A row's response is cut to ``max_response_tokens`` before rendering, so that
long BeaverTails answers fit; the judge does not cut at inference (the judged completions of a
run are shorter, 64 new tokens in the CPU protocols; a screened upload row may be longer).
Rows are split into training and held-out by whole prompts, and the held-out metrics are the
judge's own verdicts (generated, parsed, with the judge's default prompt), not the training
loss. The classes are not reweighted (the embedding judge's are): the guard keeps the data's
prior, which in ``make guard``'s rows leans to "safe" (74 of 320 training rows harmful).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.formatting import Tokenized
from hftlab.judges.llama_guard import GUARD_FILE, build_prompt

__all__ = ["GUARD_FILE", "GuardSettings", "guard_item", "train_guard"]
FORMAT = "hftlab-llama-guard-1"


@dataclass(frozen=True)
class GuardSettings:
    """How the guard is trained."""

    base: str = "embedded"  # the causal LM to teach: 'embedded', a model folder or a hub id
    epochs: int = 2
    lr: float = 5e-5  # the CPU protocols' fine-tuning lr for the embedded model
    batch_size: int = 4
    max_response_tokens: int = 128
    heldout: float = 0.2
    seed: int = 0
    precision: str = "fp32"  # auto | bf16 | fp32

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("guard training: epochs and batch size must be ≥ 1")
        if not self.lr > 0:
            raise ConfigError(f"guard training: lr must be > 0, got {self.lr}")
        if self.max_response_tokens < 1:
            raise ConfigError("guard training: max_response_tokens must be ≥ 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"guard training: precision must be auto, bf16 or fp32, got "
                              f"{self.precision!r}")


def verdict(harmful: bool) -> str:
    return "unsafe" if harmful else "safe"


def guard_item(tokenizer: Any, example: Example, max_response_tokens: int) -> Tokenized:
    """The rendered Llama Guard prompt of ``example`` as context, its verdict and the end of
    turn as the supervised tokens."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("guard training: the base model's tokenizer has no end-of-turn (eos) "
                          "token to close the verdict with; give --base a model that has one")
    response = example.response
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(response_ids) > max_response_tokens:
        response = tokenizer.decode(response_ids[:max_response_tokens])
    context = tokenizer(build_prompt(example.prompt, response),
                        add_special_tokens=False)["input_ids"]
    answer = tokenizer(verdict(example.is_harmful), add_special_tokens=False)["input_ids"]
    return Tokenized(context + answer + [tokenizer.eos_token_id], len(context))


def _fit(model: torch.nn.Module, items: list[Tokenized], pad_id: int, settings: GuardSettings,
         device: torch.device, precision: str) -> dict[str, Any]:
    """AdamW on every weight over ``epochs`` passes of length-grouped batches."""
    from hftlab.progress import progress
    from hftlab.train import (
        TrainingError,
        autocast_context,
        collate,
        length_grouped_batches,
        supervised_loss,
    )

    rng = random.Random(settings.seed)
    lengths = [len(item.input_ids) for item in items]
    plan = [length_grouped_batches(lengths, settings.batch_size, rng)
            for _ in range(settings.epochs)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    with progress(sum(len(p) for p in plan), "guard", unit="step") as bar:
        for epoch in plan:
            for indices in epoch:
                batch = collate([items[i] for i in indices], pad_id).to(device)
                with autocast_context(device, precision):
                    loss = supervised_loss(model, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"guard training: the loss is {value} at step "
                                        f"{len(losses) + 1}; lower --lr (now {settings.lr})")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                bar.update(1, loss=f"{losses[-1]:.3g}")
    first, last = losses[: len(plan[0])], losses[-len(plan[-1]):]
    return {"steps": len(losses), "first_epoch_loss": round(sum(first) / len(first), 6),
            "last_epoch_loss": round(sum(last) / len(last), 6)}


def train_guard(examples: list[Example], out: Path, data: list[str],
                settings: GuardSettings) -> dict[str, Any]:
    """Teach ``settings.base`` to judge ``examples`` less a held-out share; write the model,
    its tokenizer and ``guard.json`` (base, data, rows, settings, loss, metrics) to
    ``out``. Returns the guard.json record."""
    from hftlab.config import Config, ModelConfig, TrainConfig
    from hftlab.devices import resolve_precision
    from hftlab.judges.common import check_replaceable, evaluate_judge
    from hftlab.judges.llama_guard import LlamaGuardJudge
    from hftlab.judges.splits import split_record, training_split
    from hftlab.model import attach_trainable, load_model, load_tokenizer, resolve_model_path
    from hftlab.utils import atomic_dir

    settings.check()
    check_replaceable(out, GUARD_FILE, "a guard")
    train, heldout = training_split(examples, settings.heldout, settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    cfg = ModelConfig(name=settings.base, precision=precision)
    path = resolve_model_path(cfg.name, Config().resolved_cache_dir())
    tokenizer = load_tokenizer(path, cfg)
    model = load_model(path, cfg, device, precision, full_training=True)  # fp32 master weights
    items = [guard_item(tokenizer, e, settings.max_response_tokens) for e in train]
    model = attach_trainable(model, TrainConfig(method="full"))
    loss = _fit(model, items, tokenizer.pad_token_id, settings, device, precision)
    info: dict[str, Any] = {
        "format": FORMAT,
        "base": settings.base,
        "prompt": "Llama Guard 3 response classification (hftlab.judges.llama_guard)",
        "training": {
            "data": data,
            **split_record(examples, train, heldout),
            "split": "by prompt",
            "settings": {**asdict(settings), "precision": precision},
            "loss": loss,
            "heldout_rows": [[e.source, e.row] for e in heldout],
        },
    }
    tokenizer.chat_template = None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model  # the judge loads the saved guard, as any later run will
        if heldout:
            judge = LlamaGuardJudge(model=str(tmp), device=device.type, dtype="float32")
            metrics = evaluate_judge(judge, heldout)
            info["metrics"] = {"heldout": {k: round(v, 4) if isinstance(v, float) else v
                                           for k, v in metrics.items()},
                               "heldout_unparsed": judge.counts["unparsed"]}
        (tmp / GUARD_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info
