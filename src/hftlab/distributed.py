"""Data parallelism across processes (``accelerate launch``, ``torchrun``): which process this is,
how a global batch and an evaluation set are split between processes, and the reductions that
make N processes train the model one process trains.

Training: every process builds the same global batches (same seed, same rows); each takes a
contiguous slice of every batch and weighs its loss by its share of the batch's supervised
tokens, so that the gradients summed over processes (:func:`sum_gradients`, an explicit
all-reduce instead of DDP's, so a defense's extra backward passes are reduced too) are the
gradient of the batch's token-weighted mean loss, as one process computes it.

Evaluation: prompts are split by whole generation batches (one process's batch composition, so
padding and therefore greedy completions are unchanged) and gathered back in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hftlab.defenses.base import Defense


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for a plain ``hftlab``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_launch() -> bool:
    """Whether this is the process that writes (rank 0), read from the launcher's environment
    (usable before an Accelerator exists)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def check_multi_process(defense: Defense, processes: int, label: str | None = None) -> None:
    """Refuse a multi-process run of a defense that does not support one, in one line naming
    the defense and why (before any file is written)."""
    if processes <= 1:
        return
    reason = defense.multi_process_reason()
    if reason is not None:
        raise ConfigError(
            f"defense '{label or defense.name}' cannot run data-parallel ({processes} "
            f"processes): {reason}; run it in one process"
        )


def shard_slice(size: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous part [start, stop) of ``size`` rows that process ``rank`` of ``world``
    takes (the first ``size % world`` processes one row more)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes and how to gather Python objects."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list[Any]], list[Any]] | None = None

    @classmethod
    def of(cls, accelerator: Accelerator) -> Shard:
        from accelerate.utils import gather_object

        return cls(accelerator.process_index, accelerator.num_processes, gather_object)

    def mine(self, n_batches: int) -> list[int]:
        """The batch numbers this process generates (strided: batch k on process k % world)."""
        return list(range(self.rank, n_batches, self.world))

    def gather_texts(self, local: dict[int, str], n: int) -> list[str]:
        """Every process's ``{index: text}`` merged into one list of ``n`` texts, in order."""
        if self.world == 1 or self.gather is None:
            merged = local
        else:
            merged = dict(pair for pair in self.gather(list(local.items())))
        if len(merged) != n:
            raise RuntimeError(f"gathered {len(merged)} completions for {n} prompts")
        return [merged[i] for i in range(n)]


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) every parameter's ``.grad`` across processes, as one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def sum_across(value: torch.Tensor, world: int) -> torch.Tensor:
    """``value`` summed over processes (unchanged in one process)."""
    if world <= 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def broadcast_parameters(params: list[torch.nn.Parameter], world: int) -> None:
    """Process 0's values of ``params`` on every process (trainable weights start equal)."""
    if world <= 1:
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def batch_shard(indices: list[int], supervised: list[int], rank: int,
                world: int) -> tuple[list[int], float]:
    """(this process's rows of a global batch, the weight of its loss): its share of the batch's
    supervised tokens, so the weighted losses sum to the batch's token-weighted mean. A process
    left without rows (a batch smaller than ``world``) runs the first row at weight 0, so that
    every process takes part in each collective operation of the step."""
    if world == 1:
        return indices, 1.0
    start, stop = shard_slice(len(indices), rank, world)
    if start == stop:
        return indices[:1], 0.0
    mine = indices[start:stop]
    total = sum(supervised[i] for i in indices)
    return mine, sum(supervised[i] for i in mine) / max(total, 1)
