"""Supervised fine-tuning loop shared by the alignment and fine-tuning stages.

Speed on CPUs and GPUs alike comes from three things measured in ``benchmarks/``: bf16 autocast
where the hardware has it, logits computed only at supervised positions (the LM head over a
49k vocabulary dominates a small model's step), and length-grouped batches (little padding).
Devices, mixed precision and multi-GPU data parallelism come from ``accelerate``: the same code
runs here on a CPU and under ``accelerate launch`` on many GPUs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.config import TrainConfig
from hftlab.formatting import Tokenized
from hftlab.model import causal_lm_parts

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hftlab.defenses.base import Defense

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX at context and padding positions

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def collate(items: list[Tokenized], pad_id: int) -> Batch:
    """Right-pad a list of tokenised examples into one training batch."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, item.n_prompt : len(ids)] = ids[item.n_prompt :]
    return Batch(input_ids, attention, labels)


def length_grouped_batches(
    lengths: list[int], batch_size: int, rng: random.Random, mega: int = 50
) -> list[list[int]]:
    """Indices in batches of similar length (as ``transformers``' LengthGroupedSampler does):
    shuffle, cut into mega-batches of ``mega`` batches, sort each by length, split, shuffle."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = mega * batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def supervised_logits(
    model: torch.nn.Module, batch: Batch, **body_kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Logits at the positions that predict a supervised token, their targets, and the body
    output (hidden states for defenses that need them). The LM head runs only there."""
    body, head = causal_lm_parts(model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **body_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:  # Gemma-2
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets[keep], out


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` when ``precision`` is bf16 (weights keep their storage
    dtype); a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def supervised_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised tokens of the batch."""
    logits, targets, _ = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    items: list[Tokenized],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> float:
    """Token-weighted mean cross-entropy of ``model`` on ``items`` (evaluation mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start : start + batch_size]], pad_id).to(device)
        with autocast():
            logits, targets, _ = supervised_logits(model, batch)
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += int(targets.numel())
    model.train(was_training)
    return total / max(count, 1)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


class SFTTrainer:
    """One training stage. The defense's :meth:`training_step` computes the loss(es) and calls
    :meth:`backward`; the trainer owns batching, clipping, the optimizer and the schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        train: TrainConfig,
        accelerator: Accelerator,
        pad_id: int,
        stage: str,
        defense: Defense,
        seed: int,
        precision: str = "fp32",
        context: Any = None,
    ) -> None:
        self.model = model
        self.cfg = train
        self.accelerator = accelerator
        self.pad_id = pad_id
        self.stage = stage
        self.defense = defense
        self.seed = seed
        self.precision = precision
        self.context = context  # the RunContext, for defenses that need the run's data
        self.step = 0
        self.total_steps = 0  # set when train() starts, before the defense's setup
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self) -> Any:
        return autocast_context(self.device, self.precision)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return supervised_loss(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def plan(self, n_items: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total optimizer steps)."""
        world = self.accelerator.num_processes
        micro = math.ceil(n_items / self.cfg.batch_size / world)
        per_epoch = max(1, math.ceil(micro / self.cfg.grad_accum))
        total = self.cfg.max_steps or max(1, math.ceil(per_epoch * self.cfg.epochs))
        return per_epoch, total

    def train(
        self,
        items: list[Tokenized],
        on_step: Callable[[SFTTrainer, float], None] | None = None,
        progress: Any = None,
    ) -> TrainResult:
        """Run the stage to completion; ``on_step(trainer, loss)`` after every optimizer step."""
        if not items:
            raise ValueError(f"{self.stage}: no training examples")
        _, total_steps = self.plan(len(items))
        self.total_steps = total_steps
        params = self.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        warmup = math.ceil(self.cfg.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.cfg.schedule, warmup, total_steps)
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model.train()
        self.defense.setup(self.stage, self)
        rng = random.Random(self.seed)
        lengths = [len(item.input_ids) for item in items]
        result = TrainResult()
        start = time.perf_counter()
        paused = 0.0  # time in on_step (evaluation), kept out of the throughput
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        while self.step < total_steps:
            batches = length_grouped_batches(lengths, self.cfg.batch_size, rng)[rank::world]
            for first in range(0, len(batches), self.cfg.grad_accum):
                if self.step >= total_steps:
                    break
                group = batches[first : first + self.cfg.grad_accum]
                step_loss = 0.0
                for indices in group:
                    batch = collate([items[i] for i in indices], self.pad_id).to(self.device)
                    stats = self.defense.training_step(self.stage, self, batch)
                    step_loss += stats["loss"] / len(group)
                    result.tokens += batch.n_tokens
                if self.cfg.max_grad_norm:
                    self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                result.losses.append(step_loss)
                if progress is not None:
                    progress.update(1)
                    elapsed = time.perf_counter() - start - paused
                    progress.set_postfix(
                        loss=f"{step_loss:.3f}", tok_s=f"{result.tokens / elapsed:.0f}"
                    )
                if on_step is not None:
                    pause_start = time.perf_counter()
                    on_step(self, step_loss)
                    paused += time.perf_counter() - pause_start
        result.steps = self.step
        result.seconds = time.perf_counter() - start - paused
        self.model = self.accelerator.unwrap_model(self.model)
        return result
