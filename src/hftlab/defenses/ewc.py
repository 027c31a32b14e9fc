"""EWC: elastic weight consolidation towards the aligned model during fine-tuning (Kirkpatrick et
al. 2017, Overcoming catastrophic forgetting in neural networks, PNAS 114(13)), as the git-disl
harmful fine-tuning baseline.

The aligned model is the "previous task". Its diagonal Fisher information on the alignment data,

    F = Σ_{alignment batches b} ( ∇_w CE(w_aligned; b) )²     (squared gradient of each batch's
                                                              mean loss, summed over batches)

is computed once, before the first step, and fine-tuning minimises

    L = CE(w; x) + λ · Σ_i F_i · (w_i − w_aligned,i)²,     ∇ penalty = 2λ · F ⊙ (w − w_aligned).

Follows git-disl/Vaccine ``trainer.py`` (``FITrainer``) and ``train.py``: F over the LoRA weights
(every ``lora_A``/``lora_B`` linear), accumulated at the first training step from the evaluation
loader, which is the alignment set (``BeaverTails_safe``, its 2000 rows, in order, at
``per_device_eval_batch_size`` = the training batch size, 5); ``reg = lamb * Σ F * (w - w_init)²``
added to every micro-batch's loss; λ = 1e9 (``script/EWC_finetune/*.sh``, ``lamb=${4:-1e9}``).

What "w" is. The reference REUSES the alignment LoRA for the EWC run ("EWC REUSE THE SAME LORA",
``PeftModel.from_pretrained(..., is_trainable=True)``): w_init is the trained alignment adapter,
so F is the alignment loss's sensitivity to weights that already encode the alignment. hftlab's
fine-tuning stage instead merges the alignment adapter into the base weights and attaches a
fresh LoRA (B = 0, A random); the alignment adapter no longer exists as separate parameters (and
the saved fine-tuning adapter is re-applied on top of the merged model, so it must not contain
it). Two faithful readings, ``space``:

- ``weights`` (default): EWC over the effective weights. Every LoRA-adapted matrix is
  W = W_aligned + ΔW with ΔW = s·B·A, so w − w_aligned = ΔW exactly; F is the per-entry Fisher of
  W at W_aligned (∇_W CE = Σ_tokens (∂CE/∂y) xᵀ at the adapted linear layer, y its output), and
  the penalty is λ·Σ F ⊙ (s·B·A)², its gradient reaching A and B through the chain rule
  (∇_B = 2λs·(F ⊙ ΔW)·Aᵀ, ∇_A = 2λs·Bᵀ·(F ⊙ ΔW)). This constrains what the reference's reused
  adapter constrained: the drift of the network's weights from the aligned ones, weighted by
  their importance for the alignment data, in every direction. Costs one float32 copy of every
  adapted matrix (F) and one s·B·A product per adapted matrix per micro-batch.
- ``trainable``: the reference's code applied literally to the parameters this stage trains: F
  over the fresh adapter's A and B at their initial values, the penalty on their movement from
  init. At init B = 0, so ∂CE/∂A = s·Bᵀ(∂CE/∂y)xᵀ = 0 and **F_A is exactly zero**: A moves
  without any penalty; only B is pulled back to 0 (with F_B = Σ_b (s·(∂CE/∂y)ᵀ(A₀x))², the
  importance seen through the random A₀). Keeping B small still keeps ΔW = s·B·A small, but once
  A rotates F_B no longer measures importance along the directions B writes into, so the
  constraint is weaker than the reference's.

Under full fine-tuning the trainable parameters are the weights and w_init = w_aligned, so both
spaces are the same, exact EWC (F and w_init cost two float32 copies of the model).

Departures from the reference, and why:

- The Fisher data are the provider's alignment rows of the run (``alignment.data``), the first
  ``fisher_rows`` of them (default 2000, the size of the reference's set), batched in order.
- The reference leaves the last Fisher batch's gradient in ``.grad``, so it leaks into the first
  training step; here the Fisher pass does not touch ``.grad``.
- The penalty gradient is written into ``.grad`` directly (scaled by 1/grad_accum like the loss),
  so it enters each optimizer step once, and gradients of earlier micro-batches are kept; the
  reference's ``training_step`` adds the penalty to every micro-batch's loss and divides by
  nothing (its scripts use one micro-batch per step, where the two agree).
- λ keeps the reference value, but F's scale depends on the parameterisation (the reference's
  reused adapter vs the effective weights or the fresh adapter here), so it may need retuning.

Returned per micro-batch: ``loss`` is the cross-entropy (comparable with the other defenses) and
``ewc_penalty`` the value λ·Σ F (w − w_init)² before the step. Cost: one forward-backward per
Fisher batch at setup (space ``weights`` adds one (d_out × tokens)·(tokens × d_in) product per
adapted layer and batch), recorded as ``fisher_seconds`` in the stage's report; then plain SFT
plus the penalty's elementwise work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense
from hftlab.defenses.common import alignment_stream, first_last_means
from hftlab.model import is_peft
from hftlab.train import collate

if TYPE_CHECKING:
    from hftlab.formatting import Tokenized
    from hftlab.train import Batch, SFTTrainer

SPACES = ("weights", "trainable")


@dataclass
class AdaptedLinear:
    """One LoRA-adapted linear layer: y = W x + s·B A x."""

    module: torch.nn.Module  # the PEFT wrapper (its input is x, its output y)
    lora_A: torch.nn.Parameter  # (r, d_in)
    lora_B: torch.nn.Parameter  # (d_out, r)
    scaling: float


def adapted_linears(model: torch.nn.Module) -> list[AdaptedLinear]:
    """Every trainable plain-LoRA adapter on an ``nn.Linear`` of ``model``."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
            if not (lora_a.requires_grad and lora_b.requires_grad):
                continue
            plain = name not in getattr(module, "lora_variant", {})
            linear = isinstance(module.get_base_layer(), torch.nn.Linear)
            if not (plain and linear) or getattr(module, "fan_in_fan_out", False):
                raise ConfigError(
                    "defense 'ewc' with space: weights supports plain LoRA on nn.Linear layers "
                    "only; use space: trainable"
                )
            found.append(AdaptedLinear(module, lora_a, lora_b, float(module.scaling[name])))
    return found


def delta_weight(layer: AdaptedLinear) -> torch.Tensor:
    """ΔW = s·B·A in float32, shaped like the base weight (d_out, d_in)."""
    return layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())


@contextmanager
def record_io(modules: list[torch.nn.Module]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, keep each module's (input, output) of the last forward, in the graph."""
    seen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(modules)

    def hook_for(index: int):
        def hook(module, args, output):
            seen[index] = (args[0], output)

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    io: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        yield io
        io.extend(pair for pair in seen if pair is not None)
        if len(io) != len(modules):
            raise RuntimeError("an adapted layer did not run in the forward pass")
    finally:
        for handle in handles:
            handle.remove()


def fisher_of_trainable(
    trainer: SFTTrainer, params: list[torch.nn.Parameter], batches: Iterator[Batch]
) -> list[torch.Tensor]:
    """Σ_batches (∇_p CE(batch))² per parameter, float32; ``.grad`` is not touched."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in batches:
        loss = trainer.compute_loss(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, grad in zip(fisher, grads):
            if grad is not None:
                acc.add_(grad.float().pow(2))
    return fisher


def fisher_of_weights(
    trainer: SFTTrainer, layers: list[AdaptedLinear], batches: Iterator[Batch]
) -> list[torch.Tensor]:
    """Σ_batches (∇_W CE(batch))² for the (frozen) weight W of every adapted linear, float32,
    with ∇_W = Σ_tokens (∂CE/∂y) xᵀ taken at the layer's output y and input x."""
    fisher: list[torch.Tensor] = []
    for layer in layers:
        d_out, d_in = layer.lora_B.shape[0], layer.lora_A.shape[1]
        fisher.append(torch.zeros(d_out, d_in, dtype=torch.float32, device=layer.lora_A.device))
    modules = [layer.module for layer in layers]
    for batch in batches:
        with record_io(modules) as io:
            loss = trainer.compute_loss(batch)
        grads = torch.autograd.grad(loss, [out for _, out in io], allow_unused=True)
        for acc, (x, _), grad in zip(fisher, io, grads):
            if grad is None:
                continue
            g = grad.reshape(-1, grad.shape[-1]).float()
            inputs = x.detach().reshape(-1, x.shape[-1]).float()
            acc.add_((g.T @ inputs).pow(2))
    return fisher


def add_to_grads(params: list[torch.nn.Parameter], extra: list[torch.Tensor], scale: float
                 ) -> None:
    """p.grad += scale · extra (kept in the parameter's dtype); earlier gradients stay."""
    with torch.no_grad():
        for p, value in zip(params, extra):
            step = (scale * value).to(p.dtype)
            p.grad = step if p.grad is None else p.grad + step


@DEFENSES.register("ewc")
class EWC(Defense):
    summary = "fine-tuning stage: Fisher-weighted ℓ2 pull towards the aligned weights (EWC)"
    paper = (
        "Kirkpatrick et al. 2017, Overcoming catastrophic forgetting in neural networks, "
        "PNAS 114(13)"
    )
    reference = (
        "git-disl/Vaccine trainer.py (FITrainer), train.py (EWC reuses the alignment LoRA), "
        "script/EWC_finetune/sst2.sh"
    )
    stages = (FINETUNE,)
    resume_attributes = ("trace",)
    needs_alignment_data = True

    @dataclass
    class Options:
        lamb: float = 1e9  # λ (script/EWC_finetune/*.sh: lamb 1e9)
        space: str = "weights"  # weights (ΔW = s·B·A) | trainable (the fresh LoRA factors)
        fisher_rows: int | None = 2000  # alignment rows for F (reference: its 2000-row set)
        fisher_batch_size: int | None = None  # None: the stage's (reference: eval bs = train bs)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if o.space not in SPACES:
            raise ConfigError(
                f"defense_args.space '{o.space}' of 'ewc' must be one of {', '.join(SPACES)}"
            )
        if o.lamb < 0:
            raise ConfigError("defense_args.lamb of 'ewc' must be >= 0")
        for key in ("fisher_rows", "fisher_batch_size"):
            value = getattr(o, key)
            if value is not None and value < 1:
                raise ConfigError(f"defense_args.{key} of 'ewc' must be >= 1 (or null)")
        self.params: list[torch.nn.Parameter] = []  # space trainable
        self.start: list[torch.Tensor] = []  # their values at the start of the stage
        self.layers: list[AdaptedLinear] = []  # space weights
        self.start_delta: list[torch.Tensor | None] = []  # s·B·A at the start (None: zero)
        self.fisher: list[torch.Tensor] = []
        self.space = o.space
        self.fisher_info: dict[str, object] = {}
        self.trace: list[dict[str, float]] = []  # penalty per micro-batch

    def fisher_items(self, trainer: SFTTrainer) -> tuple[list[Tokenized], int]:
        size = self.options.fisher_batch_size or trainer.cfg.batch_size
        items = alignment_stream(trainer, size, self.name).items
        if self.options.fisher_rows is not None:
            items = items[: self.options.fisher_rows]
        return items, size

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != FINETUNE:
            return
        items, size = self.fisher_items(trainer)
        started = time.perf_counter()

        def batches() -> Iterator[Batch]:
            for start in range(0, len(items), size):
                yield collate(items[start : start + size], trainer.pad_id).to(trainer.device)

        model = trainer.accelerator.unwrap_model(trainer.model)
        # Under full fine-tuning the weights are the trainable parameters: one space.
        self.space = self.options.space if is_peft(model) else "trainable"
        if self.space == "weights":
            self.layers = adapted_linears(model)
            if not self.layers:
                raise ConfigError("defense 'ewc' found no trainable LoRA adapter on a linear layer")
            self.fisher = fisher_of_weights(trainer, self.layers, batches())
            with torch.no_grad():
                self.start_delta = [
                    delta_weight(layer) if bool(layer.lora_B.detach().any()) else None
                    for layer in self.layers
                ]
        else:
            self.params = trainer.trainable_parameters()
            self.fisher = fisher_of_trainable(trainer, self.params, batches())
            self.start = [p.detach().float().clone() for p in self.params]
        self.fisher_info = {
            "space": self.space,
            "fisher_rows": len(items),
            "fisher_batches": -(-len(items) // size),
            "fisher_sum": float(f"{sum(float(f.sum()) for f in self.fisher):.6g}"),
            # the setup pass is outside the optimizer steps, so seconds_per_step omits it
            "fisher_seconds": round(time.perf_counter() - started, 1),
        }
        self.trace = []

    @torch.no_grad()
    def penalty(self) -> tuple[float, list[torch.nn.Parameter], list[torch.Tensor]]:
        """(λ·Σ F (w − w_init)², the parameters, the penalty's gradient for each), float32."""
        lamb = self.options.lamb
        value = 0.0
        if self.space == "trainable":
            grads = []
            for p, fisher, start in zip(self.params, self.fisher, self.start):
                weighted = fisher * (p.float() - start)
                value += lamb * float((weighted * (p.float() - start)).sum())
                grads.append(2 * lamb * weighted)
            return value, self.params, grads
        params: list[torch.nn.Parameter] = []
        grads = []
        for layer, fisher, start in zip(self.layers, self.fisher, self.start_delta):
            delta = delta_weight(layer)
            if start is not None:
                delta = delta - start
            weighted = fisher * delta
            value += lamb * float((weighted * delta).sum())
            factor = 2 * lamb * layer.scaling
            params += [layer.lora_B, layer.lora_A]
            grads += [factor * weighted @ layer.lora_A.float().T,
                      factor * layer.lora_B.float().T @ weighted]
        return value, params, grads

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        value, params, grads = self.penalty()  # at w, before this micro-batch's backward
        ce = trainer.compute_loss(batch)
        trainer.backward(ce)
        add_to_grads(params, grads, 1.0 / trainer.cfg.grad_accum)
        self.trace.append({"ewc_penalty": value})
        return {"loss": float(ce.detach()), "ewc_penalty": value}

    def report(self, stage: str) -> dict[str, object]:
        """How the Fisher was computed, and the penalty λ·Σ F (w − w_init)² averaged over the
        first and last tenth of the stage (it grows as the weights leave the aligned ones)."""
        if stage != FINETUNE or not self.trace:
            return {}
        return {**self.fisher_info, **first_last_means(self.trace)}
