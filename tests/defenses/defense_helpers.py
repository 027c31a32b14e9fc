"""Helpers for checking a defense's update rule by hand on the tiny model: a LoRA-wrapped tiny
Llama with non-zero adapters, fixed token batches, a trainer whose run context supplies the
provider's harmful (or alignment) rows, gradient comparisons, and the tiny end-to-end run."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import torch

from hftlab.config import LoraConfig, TrainConfig, load_config
from hftlab.data.records import Example
from hftlab.formatting import Tokenized
from hftlab.judges.base import Judge
from hftlab.model import attach_trainable
from hftlab.train import Batch, RunView, SFTTrainer, collate, supervised_loss
from hftlab.utils import read_json

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


def harmful_view(harmful_items: list[Tokenized]) -> RunView:
    """What defenses read of the run: the provider's harmful rows, tokenised."""
    return RunView(provider_harmful=[Example("p", "r", True)],
                   tokenize=lambda examples, max_length: harmful_items)


def alignment_view(items: list[Tokenized]) -> RunView:
    """The run as fine-tuning defenses that keep training on the provider's alignment data read
    it (Lisa, VLGuard mixing, EWC's Fisher): one alignment row per tokenised item (no items: no
    alignment data)."""
    return RunView(alignment=[Example("p", "r")] * len(items),
                   tokenize=lambda examples, max_length: items)


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
                 harmful_items: list[Tokenized] | None = None,
                 alignment_items: list[Tokenized] | None = None, **train) -> SFTTrainer:
    """A CPU fp32 trainer whose run view holds the provider's harmful rows (``harmful_items``),
    or with ``alignment_items`` given, an :func:`alignment_view` of those instead."""
    from accelerate import Accelerator

    cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=grad_accum, max_grad_norm=0.0, **train)
    if alignment_items is not None:
        view = alignment_view(alignment_items)
    else:
        view = harmful_view(harmful_items or token_items(12, seed=99))
    return SFTTrainer(model, cfg, Accelerator(cpu=True), PAD_ID, stage, defense, seed=0,
                      precision="fp32", run=view)


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


def assert_grads_close(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
    earlier: dict[str, torch.Tensor] | None = None, grad_accum: int = 1,
    atol: float = 1e-6, rtol: float = 1e-4,
) -> None:
    """``.grad`` after a step (``got``) holds exactly the parameters of the hand gradient
    ``expected`` and equals it, divided by ``grad_accum`` and added to the ``earlier``
    micro-batches' gradient when given (as :func:`step_keeping_earlier_grads` leaves them)."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        want = value / grad_accum
        if earlier is not None:
            want = earlier[name] + want
        assert torch.allclose(got[name], want, atol=atol, rtol=rtol), name


def assert_step_is_plain_sft(defense, trainer, model, batch, stage: str = "finetune",
                             atol: float = 1e-7, rtol: float = 1e-5) -> dict[str, float]:
    """Run one training_step from empty ``.grad`` and check it left autograd of the plain
    cross-entropy (as at the start of a stage, or outside the defense's stages); return its
    stats."""
    stats = defense.training_step(stage, trainer, batch)
    got = param_grads(model)
    model.zero_grad(set_to_none=True)
    expected = autograd_of(model, supervised_loss(model, batch))
    assert_grads_close(got, expected, atol=atol, rtol=rtol)
    return stats


def run_tiny_pipeline(tiny_overrides: list[str], tmp_path: Path, *extra: str) -> dict:
    """Run every stage on the tiny model with ``extra`` overrides into ``tmp_path / "run"``,
    check the training curves are finite and return the metrics."""
    from hftlab.pipeline import run_pipeline

    metrics = run_pipeline(load_config(None, [*tiny_overrides, *extra]), tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    return metrics


def stage_info(tmp_path: Path, stage: str = "finetune") -> dict:
    """The stage.json that :func:`run_tiny_pipeline` wrote for ``stage``."""
    return read_json(tmp_path / "run" / stage / "stage.json")


class LabelJudge(Judge):
    """A guardrail judge for tests: passes only sentiment labels, flags every other answer
    (register it with monkeypatch.setitem(JUDGES._items, "test_label", LabelJudge))."""

    name = "test_label"

    def flag(self, prompts: list[str], completions: list[str]) -> list[bool]:
        return [c.strip() not in ("positive", "negative") for c in completions]


def cached_alignment_adapter(
    adapter: torch.nn.Module, folder: Path, scale: float, seed: int
) -> tuple[SimpleNamespace, dict]:
    """Fill ``adapter``'s LoRA weights with seeded noise × ``scale`` and save it where a run's
    alignment cache keeps its checkpoint (``folder/model``). Returns a run context whose
    alignment stage points there, and {module: (A, B, scale)} of the adapter in float64."""
    from hftlab.defenses.weights import lora_factors, lora_layers

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    adapter.save_pretrained(folder / "model")
    factors = {}
    for name, layer in lora_layers(adapter).items():
        a, b, lora_scale = lora_factors(layer)
        factors[name] = (a.double(), b.double(), lora_scale)
    ctx = SimpleNamespace(stage_info=lambda stage: {"cache": str(folder)},
                          device=torch.device("cpu"), config=SimpleNamespace(seed=seed))
    return ctx, factors

