"""Pieces several defenses share: an endless stream of batches from an extra data set (the
provider's harmful QA, alignment data), the decoder blocks of a model, gradient bookkeeping
over the trainable parameters (extra passes: :mod:`hftlab.train_grads`), and forward hooks that
add a tensor to a module's output."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError
from hftlab.formatting import Tokenized
from hftlab.model import causal_lm_parts
from hftlab.train import Batch, collate

if TYPE_CHECKING:
    from hftlab.data.records import Example
    from hftlab.train import SFTTrainer


class BatchStream:
    """Endless random micro-batches from ``items``: each pass is a fresh seeded shuffle (as the
    reference trainers' ``RandomSampler`` + re-created iterator do)."""

    def __init__(
        self, items: list[Tokenized], batch_size: int, pad_id: int, device: torch.device,
        seed: int,
    ) -> None:
        if not items:
            raise ValueError("BatchStream needs at least one example")
        self.items = items
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.device = device
        self.rng = random.Random(seed)
        self._order: list[int] = []

    def next(self) -> Batch:
        if len(self._order) < self.batch_size:
            fresh = list(range(len(self.items)))
            self.rng.shuffle(fresh)
            self._order.extend(fresh)
        indices, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return collate([self.items[i] for i in indices], self.pad_id).to(self.device)

    def state_dict(self) -> dict[str, object]:
        """Where the stream stands (for a trainer checkpoint); the items are rebuilt by setup."""
        return {"rng": self.rng.getstate(), "order": list(self._order)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rng.setstate(state["rng"])  # type: ignore[arg-type]
        self._order = list(state["order"])  # type: ignore[call-overload]


def provider_harmful_stream(trainer: SFTTrainer, batch_size: int, who: str) -> BatchStream:
    """Batches of the provider's own harmful QA (``provider_harmful`` in the config), tokenised
    like the stage's training data; ``who`` names the defense in the error."""
    return _provider_stream(
        trainer, trainer.run.provider_harmful, batch_size, 1,
        f"defense '{who}' needs the provider's harmful QA: set provider_harmful "
        "(e.g. provider_harmful={kind: demo_harmful_qa, n: 90}, or see configs/cpu_sst2.yaml)",
    )


def alignment_stream(trainer: SFTTrainer, batch_size: int, who: str) -> BatchStream:
    """Batches of the provider's alignment data (the run's ``alignment.data``, refusals), for
    fine-tuning-stage defenses that keep training on it (Lisa, VLGuard mixing, EWC's Fisher)."""
    return _provider_stream(
        trainer, trainer.run.alignment, batch_size, 4,
        f"defense '{who}' needs the provider's alignment data during fine-tuning: "
        "set alignment.enabled: true and alignment.data",
    )


def _provider_stream(
    trainer: SFTTrainer, rows: list[Example], batch_size: int, seed_offset: int, missing: str
) -> BatchStream:
    """A stream of ``rows`` tokenised like the stage's training data, shuffled from the trainer's
    seed + ``seed_offset`` (one offset per data set); ConfigError(``missing``) if empty."""
    tokenize = trainer.run.tokenize
    if not rows or tokenize is None:
        raise ConfigError(missing)
    items = tokenize(rows, trainer.cfg.max_length)
    return BatchStream(items, batch_size, trainer.pad_id, trainer.device,
                       trainer.seed + seed_offset)


@contextmanager
def stage_start_model(trainer: SFTTrainer, frozen_copy: torch.nn.Module | None = None
                      ) -> Iterator[torch.nn.Module]:
    """The model as it was when the stage began, for no-grad reference forwards: with LoRA the
    same network with the adapters switched off; under full fine-tuning ``frozen_copy`` (make
    one at ``setup`` with :func:`frozen_copy_if_full`)."""
    from hftlab.model import is_peft

    model = trainer.accelerator.unwrap_model(trainer.model)
    if frozen_copy is not None:
        with torch.no_grad():
            yield frozen_copy
        return
    if not is_peft(model):
        raise ValueError("full fine-tuning needs a frozen copy (frozen_copy_if_full at setup)")
    with torch.no_grad(), model.disable_adapter():
        yield model


def frozen_copy_if_full(trainer: SFTTrainer) -> torch.nn.Module | None:
    """A frozen deep copy of the model under full fine-tuning; None with LoRA (adapters off
    give the stage-start model for free)."""
    import copy

    from hftlab.model import is_peft

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft(model):
        return None
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a (possibly PEFT-wrapped) causal LM, first to last."""
    body, _ = causal_lm_parts(model)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None:
        raise ConfigError(f"cannot find the decoder layers of {type(body).__name__}")
    return list(layers)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each block's self-attention module (``self_attn`` in Llama, Qwen, Mistral, Gemma…)."""
    return _block_parts(model, ("self_attn", "attn"))


def mlp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each block's MLP (``mlp``; the output LDIFS and RepNoise take as the block's features)."""
    return _block_parts(model, ("mlp",))


def _block_parts(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The submodule of every decoder block found under the first of ``names`` it has."""
    found = []
    for layer in decoder_layers(model):
        part = next((getattr(layer, n) for n in names if getattr(layer, n, None) is not None),
                    None)
        if part is None:
            raise ConfigError(f"{type(layer).__name__} has no {names[0]} module")
        found.append(part)
    return found


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together (not per tensor)."""
    return torch.linalg.vector_norm(torch.stack([t.float().norm() for t in tensors]))


def first_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def replace_first_output(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return tensor


@contextmanager
def add_to_outputs(
    modules: list[torch.nn.Module], deltas: list[torch.Tensor | None]
) -> Iterator[None]:
    """Within the block, each module's (first) output is shifted by its delta (None: kept)."""

    def hook_for(delta: torch.Tensor):
        def hook(module, args, output):
            hidden = first_output(output)
            return replace_first_output(output, hidden + delta.to(hidden.dtype))

        return hook

    handles = [m.register_forward_hook(hook_for(d)) for m, d in zip(modules, deltas)
               if d is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_outputs(modules: list[torch.nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, keep each module's (first) output tensor of the last forward, still in
    the autograd graph, so gradients with respect to it can be taken (None until it runs)."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(index: int):
        def hook(module, args, output):
            outputs[index] = first_output(output)

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def first_last_means(trace: list[dict[str, float]]) -> dict[str, float]:
    """``key_first`` / ``key_last``: each traced value averaged over the first and the last tenth
    of a stage's micro-batches (6 significant digits), for a defense's ``report``."""
    k = max(1, len(trace) // 10)
    out: dict[str, float] = {}
    for part, rows in (("first", trace[:k]), ("last", trace[-k:])):
        for key in dict.fromkeys(key for row in rows for key in row):
            values = [row[key] for row in rows if key in row]
            out[f"{key}_{part}"] = float(f"{sum(values) / len(values):.6g}")
    return out
