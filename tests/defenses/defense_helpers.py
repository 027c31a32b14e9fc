"""Helpers for checking a defense's update rule by hand on the tiny model: a LoRA-wrapped tiny
Llama with non-zero adapters, fixed token batches, and a trainer whose run context supplies the
provider's harmful rows."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hftlab.config import LoraConfig, TrainConfig
from hftlab.data.records import Example
from hftlab.formatting import Tokenized
from hftlab.judges.base import Judge
from hftlab.model import attach_trainable
from hftlab.train import Batch, SFTTrainer, collate

PAD_ID = 0


def token_items(n: int, seed: int, vocab: int = 200, prompt: int = 3) -> list[Tokenized]:
    rng = random.Random(seed)
    return [
        Tokenized([rng.randrange(4, vocab) for _ in range(rng.randrange(prompt + 3, prompt + 9))],
                  prompt)
        for _ in range(n)
    ]


def token_batch(n: int, seed: int) -> Batch:
    return collate(token_items(n, seed), PAD_ID)


@dataclass
class FakeData:
    provider_harmful: list[Example]


@dataclass
class FakeContext:
    """What defenses read from the run context: the provider's harmful rows, tokenised."""

    harmful_items: list[Tokenized]
    data: FakeData = field(default_factory=lambda: FakeData([Example("p", "r", True)]))

    def tokenize(self, examples, max_length):
        return self.harmful_items


def lora_model(model_dir: Path, layers_lora_b: float = 0.05) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = attach_trainable(model, TrainConfig(lora=LoraConfig(r=4, alpha=8)))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, layers_lora_b)
    return model


def make_trainer(model, defense, stage: str = "alignment", grad_accum: int = 1,
                 harmful_items: list[Tokenized] | None = None, **train) -> SFTTrainer:
    from accelerate import Accelerator

    cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=grad_accum, max_grad_norm=0.0, **train)
    context = FakeContext(harmful_items or token_items(12, seed=99))
    return SFTTrainer(model, cfg, Accelerator(cpu=True), PAD_ID, stage, defense, seed=0,
                      precision="fp32", context=context)



def param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def autograd_of(model, loss) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, params)))


class Cycle:
    """Stands in for a defense's BatchStream: yields the given batches in turn, forever."""

    def __init__(self, *batches: Batch) -> None:
        self.batches = batches
        self.calls = 0

    def next(self) -> Batch:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return batch


def step_keeping_earlier_grads(defense, trainer, model, batch, stage: str = "alignment"):
    """Run one training_step with a fake earlier micro-batch gradient (0.25 everywhere) in
    ``.grad``; check the weights come back bitwise; return (stats, .grad after, earlier)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    earlier = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()
               if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = earlier[n].clone()
    stats = defense.training_step(stage, trainer, batch)
    got = param_grads(model)
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was not restored exactly"
    return stats, got, earlier


class LabelJudge(Judge):
    """A guardrail judge for tests: passes only sentiment labels, flags every other answer
    (register it with monkeypatch.setitem(JUDGES._items, "test_label", LabelJudge))."""

    name = "test_label"

    def flag(self, prompts: list[str], completions: list[str]) -> list[bool]:
        return [c.strip() not in ("positive", "negative") for c in completions]
