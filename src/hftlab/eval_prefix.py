"""Shared-prefix KV caching for batched greedy generation.

An evaluation set's prompts share their opening tokens: the chat header, the system prompt (a
150-token BackdoorAlign trigger, the AOA persona) and often a fixed user-turn prefix. The
prefix's keys and values are computed once and copied into each batch's cache, so prefill runs
only on the rest of each prompt.

The completions stay those of left padding: a batch is laid out as [prefix][padding][suffix],
the suffixes right-aligned so that every row predicts its next token at the last column, as
under left padding. Padding is masked and ``generate`` derives position ids from the mask's
cumulative sum, so every real token keeps the position (and sees the tokens) it has when the
prompt is fed unpadded. tests/test_eval_prefix.py checks that the completions are identical.

That holds bit for bit only where a matrix product's rows do not depend on how many rows it has:
fp32 on the CPU. oneDNN's bf16 kernels round a row differently with the matrix's height, so a
prefix encoded alone gets keys a few bf16 steps off those it gets inside the batch, and some
greedy completions change (as they already do with the batch size). Sharing is therefore on by
default only in fp32 on the CPU (:func:`sharing_is_exact`).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from hftlab.model import causal_lm_parts, is_peft

# Below this many shared tokens the copies cost about what the prefill saves.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Length of the rows' longest common token prefix, leaving every row at least one token of
    its own (generation needs an uncached last position to predict from)."""
    if len(rows) < 2:
        return 0
    common = os.path.commonprefix(rows)  # compares only the smallest and largest row
    return min(len(common), min(len(r) for r in rows) - 1)


def prefix_padded(
    rows: list[list[int]], shared: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids laid out as [shared prefix][padding][own suffix], and their attention mask."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    input_ids[:, :shared] = torch.tensor(rows[0][:shared])
    attention[:, :shared] = 1
    for row, ids in enumerate(rows):
        suffix = ids[shared:]
        input_ids[row, width - len(suffix) :] = torch.tensor(suffix)
        attention[row, width - len(suffix) :] = 1
    return input_ids, attention


def sharing_is_exact(model: torch.nn.Module, device: torch.device,
                     autocast: Callable[[], Any]) -> bool:
    """Whether a shared prefix leaves the completions bit for bit unchanged: fp32 weights and no
    lower-precision autocast, on the CPU (GPU kernels pick their algorithm by shape too)."""
    if device.type != "cpu":
        return False
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        return False
    with autocast():
        return not cpu_autocast_enabled()


def cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which this transformers version takes a KV cache (``cache`` from 5.x,
    ``past_key_values`` before)."""
    base = model.get_base_model() if is_peft(model) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class SharedPrefix:
    """The KV cache of the last prefix seen, built once; each batch gets its own copy, expanded
    to the batch size (``generate`` appends to the cache it is given)."""

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 autocast: Callable[[], Any]) -> None:
        self.body = causal_lm_parts(model)[0]  # no output head: the prefix's logits are unused
        self.keyword = cache_keyword(model)
        self.device = device
        self.autocast = autocast
        self.ids: list[int] | None = None
        self.cache: Any = None

    def generate_kwargs(self, prefix: list[int], batch_size: int) -> dict[str, Any]:
        """``generate`` keyword arguments holding a copy of ``prefix``'s cache for a batch."""
        if prefix != self.ids:
            with torch.no_grad(), self.autocast():
                out = self.body(input_ids=torch.tensor([prefix], device=self.device),
                                use_cache=True)
            self.cache = out[self.keyword]
            self.ids = list(prefix)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return {self.keyword: cache}
