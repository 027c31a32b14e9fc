"""Supervised fine-tuning loop shared by the alignment and fine-tuning stages.

Speed on CPUs and GPUs alike comes from three things measured in ``benchmarks/``: bf16 autocast
where the hardware has it, logits computed only at supervised positions (the LM head over a
49k vocabulary dominates a small model's step), and length-grouped batches (little padding).
Devices, mixed precision and multi-GPU data parallelism come from ``accelerate``: the same code
runs here on a CPU and under ``accelerate launch`` on many GPUs.

A stage can save a checkpoint every k optimizer steps (trainable weights, optimizer and schedule,
the random generators, the defense's and the callback's state) and a rerun resumes from it to
the same weights an uninterrupted run reaches: multi-hour alignment stages (RepNoise, TAR,
Booster on a CPU; the reference step counts on a GPU) survive preemption and can be split
across sessions. Each checkpoint is committed as one unit and stored without pickle
(:mod:`hftlab.checkpoint`), so a kill at any moment leaves the previous one or the new one.

A step whose loss is not finite stops the stage (:class:`TrainingError`) before the optimizer
applies it: diverged weights are never saved, checkpointed or cached.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.config import ConfigError, TrainConfig
from hftlab.distributed import batch_shard, broadcast_parameters, sum_across, sum_gradients
from hftlab.formatting import Tokenized
from hftlab.model import causal_lm_parts
from hftlab.progress import Progress, progress
from hftlab.train_checkpoint import CheckpointedTrainer, Resumable, StageRun, TrainResult
from hftlab.train_grads import ExtraPasses

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hftlab.data.records import Example
    from hftlab.defenses.base import Defense

__all__ = ["IGNORE_INDEX", "Batch", "Resumable", "RunView", "SFTTrainer", "TrainResult",
           "TrainingError", "autocast_context", "collate", "mean_loss", "supervised_logits",
           "supervised_loss"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TrainingError(ConfigError):
    """A stage that cannot go on (its loss diverged); a ConfigError, so the command line
    reports it in one line, as it does a setting that needs changing."""


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


@dataclass(frozen=True)
class RunView:
    """What a training stage's defense may read of its run besides the trainer's own model,
    batches and step: the provider's data sets, how the run tokenises rows, and where the stage
    keeps its files. The stages build it; defense tests build it from plain lists."""

    alignment: list[Example] = field(default_factory=list)  # alignment.data, as trained on
    provider_harmful: list[Example] = field(default_factory=list)  # the provider's harmful QA
    # the run's tokenisation (rows whose prompt fills ``max_length`` dropped); None: no rows
    tokenize: Callable[[list[Example], int], list[Tokenized]] | None = None
    folder: Path | None = None  # the stage's folder in the run (None: the stage saves nothing)
    is_main: bool = True  # the main process (the one that writes files)


class SFTTrainer(CheckpointedTrainer):
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
        run: RunView | None = None,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0,
        checkpoint_minutes: float = 0.0,
    ) -> None:
        self.model = model
        self.cfg = train
        self.accelerator = accelerator
        self.pad_id = pad_id
        self.stage = stage
        self.defense = defense
        self.seed = seed
        self.precision = precision
        self.run = run or RunView()  # what the defense may read of the run
        self.step = 0
        self.total_steps = 0  # set when train() starts, before the defense's setup
        self.optimizer: torch.optim.Optimizer | None = None
        # resuming: a checkpoint every ``checkpoint_every`` optimizer steps and every
        # ``checkpoint_minutes`` (0: never)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.checkpoint_minutes = checkpoint_minutes
        self.last_save = time.monotonic()
        self.resumed_from = 0  # the step a resumed stage continued from (0: a fresh start)
        # this process's share of the current global batch's supervised tokens (1 alone): the
        # weight of its micro-batch loss, so gradients summed over processes are one process's
        self.shard_weight = 1.0

    @property
    def world(self) -> int:
        """How many processes train together (data parallel)."""
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def sum_across(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes (itself in one process)."""
        return sum_across(value, self.world)

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
        if self.world > 1:
            loss = loss * self.shard_weight
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def extra_passes(self, params: list[torch.nn.Parameter] | None = None) -> ExtraPasses:
        """Extra forward/backward passes within one micro-batch (see
        :class:`hftlab.train_grads.ExtraPasses`); ``params``: the trainable ones by default."""
        return ExtraPasses(self.trainable_parameters() if params is None else params,
                           self.accelerator.backward)

    def plan(self, n_items: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total optimizer steps); the same for any number of
        processes (they split each global batch)."""
        micro = math.ceil(n_items / self.cfg.batch_size)
        per_epoch = max(1, math.ceil(micro / self.cfg.grad_accum))
        total = self.cfg.max_steps or max(1, math.ceil(per_epoch * self.cfg.epochs))
        return per_epoch, total

    def train(
        self,
        items: list[Tokenized],
        on_step: Callable[[SFTTrainer, float], None] | None = None,
    ) -> TrainResult:
        """Run the stage to completion, its progress shown (:mod:`hftlab.progress`);
        ``on_step(trainer, loss)`` after every optimizer step."""
        if not items:
            raise ValueError(f"{self.stage}: no training examples")
        _, total_steps = self.plan(len(items))
        with progress(total_steps, f"{self.stage} ({len(items)} rows)",
                      enabled=self.accelerator.is_main_process) as bar:
            return self._train(items, total_steps, on_step, bar)

    def _train(self, items: list[Tokenized], total_steps: int,
               on_step: Callable[[SFTTrainer, float], None] | None, bar: Progress) -> TrainResult:
        self.total_steps = total_steps
        params = self.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        warmup = math.ceil(self.cfg.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.cfg.schedule, warmup, total_steps)
        )
        if self.world == 1:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        else:  # no DDP wrapper: gradients (extra passes' too) are summed after the step's batches
            self.optimizer = self.accelerator.prepare(self.optimizer)
            broadcast_parameters(params, self.world)
        self.model.train()
        self.defense.setup(self.stage, self)
        # named once, before a defense can freeze some of them (T-Vaccine's layer sampling)
        named = [
            (name, p)
            for name, p in self.accelerator.unwrap_model(self.model).named_parameters()
            if p.requires_grad
        ]
        result = TrainResult()
        run = StageRun(named, scheduler, result, on_step, len(items), total_steps)
        done = self.load_checkpoint(run)
        bar.skip(done)
        self.last_save = time.monotonic()
        rng = random.Random(self.seed)
        lengths = [len(item.input_ids) for item in items]
        start = time.perf_counter() - result.seconds
        paused = 0.0  # time in on_step (evaluation) and checkpointing, kept out of throughput
        rank, world = self.accelerator.process_index, self.world
        supervised = [item.n_supervised for item in items]
        position = 0  # optimizer steps walked through, replayed ones included
        while self.step < total_steps:
            batches = length_grouped_batches(lengths, self.cfg.batch_size, rng)
            for first in range(0, len(batches), self.cfg.grad_accum):
                if self.step >= total_steps:
                    break
                position += 1
                if position <= done:  # trained before the checkpoint: same order, no compute
                    continue
                group = batches[first : first + self.cfg.grad_accum]
                step_loss = 0.0
                for indices in group:
                    mine, self.shard_weight = batch_shard(indices, supervised, rank, world)
                    batch = collate([items[i] for i in mine], self.pad_id).to(self.device)
                    stats = self.defense.training_step(self.stage, self, batch)
                    step_loss += self.shard_weight * stats["loss"] / len(group)
                    result.tokens += sum(lengths[i] for i in indices)
                if world > 1:
                    sum_gradients(params)
                    step_loss = float(sum_across(torch.tensor(step_loss, dtype=torch.float64),
                                                 world))
                self.check_finite(step_loss, total_steps)
                if self.cfg.max_grad_norm:
                    self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                result.losses.append(step_loss)
                elapsed = time.perf_counter() - start - paused
                bar.update(1, loss=step_loss, tok_s=result.tokens / max(elapsed, 1e-9))
                pause_start = time.perf_counter()
                if on_step is not None:
                    on_step(self, step_loss)
                if self.checkpoint_due(total_steps):
                    result.seconds = pause_start - start - paused
                    self.save_checkpoint(run)
                paused += time.perf_counter() - pause_start
        result.steps = self.step
        result.seconds = time.perf_counter() - start - paused
        self.model = self.accelerator.unwrap_model(self.model)
        return result

    def check_finite(self, loss: float, total_steps: int) -> None:
        """Raise :class:`TrainingError` when the step's loss is inf or nan on any process
        (all of them stop at the same step, none waits for the others)."""
        finite = math.isfinite(loss)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor([float(finite)], device=self.device))
            finite = bool(flags.min() > 0)
        if finite:
            return
        raise TrainingError(
            f"{self.stage}: the training loss is {loss} at step {self.step + 1} of "
            f"{total_steps}: the weights diverged; lower the learning rate "
            f"({self.stage}.train.lr, now {self.cfg.lr}) or check the training data"
        )
