"""EWC: elastic weight consolidation towards the aligned model during fine-tuning (Kirkpatrick et
al. 2017, Overcoming catastrophic forgetting in neural networks, PNAS 114(13)), as the git-disl
harmful fine-tuning baseline.

The aligned model is the "previous task". Its diagonal Fisher information on the alignment data,

    F = Σ_{alignment batches b} ( ∇_w CE(w_aligned; b) )²     (squared gradient of each batch's
                                                              mean loss, summed over batches)

is computed once, before the first step, and fine-tuning minimises

    L = CE(w; x) + λ · Σ_i F_i · (w_i − w_aligned,i)²,     ∇ penalty = 2λ · F ⊙ (w − w_aligned).

Follows git-disl/Vaccine ``trainer.py`` (``FITrainer``) and ``train.py``: EWC REUSES the alignment
LoRA ("EWC REUSE THE SAME LORA": ``PeftModel.from_pretrained(..., is_trainable=True)``, unmerged;
r 8, α 4, all seven linear layers, dropout 0.1, scale 0.5), so fine-tuning keeps training it and
w_init is the trained alignment adapter. F is over that adapter's factors (every ``lora_A`` /
``lora_B`` linear), accumulated at the first training step from the evaluation loader, which is
the alignment set (``BeaverTails_safe``, its 2000 rows, in order, at ``per_device_eval_batch_size``
5: 400 batches); ``reg = lamb * Σ F * (w - w_init)²`` is added to every micro-batch's loss;
λ = 1e9 (``script/EWC_finetune/*.sh``, ``lamb=${4:-1e9}``). The run's other settings (lr 1e-5,
20 epochs, batch 5, the alignment run) are listed in ``EWC.reference_settings``.

What "w" is, option ``space``:

- ``alignment_adapter`` (default, the reference): the fine-tuning stage continues the alignment
  LoRA (``continues_alignment_adapter``; the pipeline loads it unmerged and trainable,
  ``stage_models.aligned_adapter_model``), F is over its A and B at their aligned values and the
  penalty pulls them back there. Both stages must then use LoRA with the same settings
  (``context.check_continued_adapter``); ``lora: {preset: vaccine}`` is the reference's.
- ``weights``: fine-tuning attaches a fresh LoRA (B = 0, A random) to the merged aligned model
  and EWC acts on the effective weights. Every LoRA-adapted matrix is W = W_aligned + ΔW with
  ΔW = s·B·A, so w − w_aligned = ΔW exactly; F is the per-entry Fisher of W at W_aligned
  (∇_W CE = Σ_tokens (∂CE/∂y) xᵀ at the adapted linear layer, y its output), and the penalty is
  λ·Σ F ⊙ (s·B·A)², its gradient reaching A and B through the chain rule
  (∇_B = 2λs·(F ⊙ ΔW)·Aᵀ, ∇_A = 2λs·Bᵀ·(F ⊙ ΔW)). It constrains the drift of the network's
  weights from the aligned ones in every direction, weighted by their importance for the
  alignment data. Costs one float32 copy of every adapted matrix (F) and one s·B·A product per
  adapted matrix per micro-batch.
- ``trainable``: a fresh LoRA on the merged aligned model, with the reference's code applied
  literally to it: F over its A and B at their initial values, the penalty on their movement
  from init. At init B = 0, so ∂CE/∂A = s·Bᵀ(∂CE/∂y)xᵀ = 0 and **F_A is exactly zero**: A moves
  without any penalty; only B is pulled back to 0 (with F_B = Σ_b (s·(∂CE/∂y)ᵀ(A₀x))², the
  importance seen through the random A₀), a weaker constraint than the reference's.

Under full fine-tuning (``weights`` or ``trainable``; ``alignment_adapter`` needs LoRA) the
trainable parameters are the weights and w_init = w_aligned, so both are the same, exact EWC
(F and w_init cost two float32 copies of the model).

Departures from the reference, and why:

- The Fisher data are the provider's alignment rows of the run (``alignment.data``), the first
  ``fisher_rows`` of them (default 2000, the size of the reference's set), batched in order by
  ``fisher_batch_size`` (default 5, the reference's: 400 batches of 2000 rows; null: the
  fine-tuning batch size).
- The reference leaves the last Fisher batch's gradient in ``.grad``, so it leaks into the first
  training step; here the Fisher pass does not touch ``.grad``.
- The reference computes F in training mode (its LoRA dropout 0.1 active); here too, with the
  dropout of the run's LoRA (``lora.dropout``).
- The penalty gradient is written into ``.grad`` directly (scaled by 1/grad_accum like the loss),
  so it enters each optimizer step once, and gradients of earlier micro-batches are kept; the
  reference's ``training_step`` adds the penalty to every micro-batch's loss and divides by
  nothing (its scripts use one micro-batch per step, where the two agree).
- λ keeps the reference value; F's scale depends on the parameterisation (space), the LoRA and
  the batch size, so outside the reference setup it may need retuning. Data-parallel: each
  process takes every world-th Fisher batch and the sums are added across processes.

Returned per micro-batch: ``loss`` is the cross-entropy (comparable with the other defenses) and
``ewc_penalty`` the value λ·Σ F (w − w_init)² before the step. Cost: one forward-backward per
Fisher batch at setup (space ``weights`` adds one (d_out × tokens)·(tokens × d_in) product per
adapted layer and batch), recorded as ``fisher_seconds`` in the stage's report; then plain SFT
plus the penalty's elementwise work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hftlab.config import ALL_LINEAR, ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import alignment_stream, first_last_means
from hftlab.model import is_peft
from hftlab.progress import progress
from hftlab.train import collate

if TYPE_CHECKING:
    from hftlab.formatting import Tokenized
    from hftlab.train import Batch, SFTTrainer

# alignment_adapter: continue the alignment LoRA (reference); weights / trainable: a fresh LoRA
SPACES = ("alignment_adapter", "weights", "trainable")
SCRIPT = "git-disl/Vaccine script/EWC_finetune/sst2.sh"
ALIGN_SCRIPT = "git-disl/Vaccine script/alignment/SFT.sh"
TRAIN_PY = "git-disl/Vaccine train.py"
ADAPTER_NOTE = ("train.py's LoraConfig of the alignment adapter, which EWC keeps training: both "
                "stages need the same LoRA (lora: {preset: vaccine})")


def lora_settings(stage: str) -> tuple[ReferenceSetting, ...]:
    """The reference's LoRA (r 8, lora_alpha 4, all seven linear layers, dropout 0.1)."""
    values = (("r", 8), ("alpha", 4), ("target_modules", list(ALL_LINEAR)), ("dropout", 0.1))
    return tuple(ReferenceSetting(f"{stage}.train.lora.{key}", value, TRAIN_PY, ADAPTER_NOTE)
                 for key, value in values)


REFERENCE_SETTINGS = (
    ReferenceSetting("defense_args.lamb", 1e9, SCRIPT, "lamb=${4:-1e9} (all three scripts)"),
    ReferenceSetting("defense_args.space", "alignment_adapter", TRAIN_PY,
                     "EWC REUSE THE SAME LORA: PeftModel.from_pretrained(lora_folder, "
                     "is_trainable=True); F over its lora_A/lora_B (trainer.py FITrainer)"),
    ReferenceSetting("defense_args.fisher_rows", 2000, TRAIN_PY,
                     "the eval set, BeaverTails_safe: the first 2000 is_safe rows of 30k_train"),
    ReferenceSetting("defense_args.fisher_batch_size", 5, SCRIPT,
                     "--per_device_eval_batch_size 5: 400 Fisher batches"),
    ReferenceSetting("finetune.train.lr", 1e-5, SCRIPT, "--learning_rate 1e-5"),
    ReferenceSetting("finetune.train.epochs", 20, SCRIPT,
                     "--num_train_epochs 20 (sst2.sh, agnews.sh; gsm8k.sh: 50, commented out)"),
    ReferenceSetting("finetune.train.batch_size", 5, SCRIPT, "--per_device_train_batch_size 5"),
    ReferenceSetting("finetune.train.grad_accum", 1, SCRIPT, "--gradient_accumulation_steps 1"),
    ReferenceSetting("finetune.train.weight_decay", 0.1, SCRIPT, "--weight_decay 0.1"),
    ReferenceSetting("finetune.train.schedule", "cosine", SCRIPT, "--lr_scheduler_type cosine"),
    ReferenceSetting("finetune.train.warmup_ratio", 0.1, SCRIPT, "--warmup_ratio 0.1"),
    *lora_settings("finetune"),
    ReferenceSetting("alignment.data", "BeaverTails_safe: the first 2000 is_safe rows of "
                     "30k_train", TRAIN_PY, "SupervisedDataset; also the Fisher set"),
    ReferenceSetting("alignment.train.lr", 1e-3, ALIGN_SCRIPT, "--learning_rate 1e-3"),
    ReferenceSetting("alignment.train.epochs", 50, ALIGN_SCRIPT, "--num_train_epochs 50"),
    ReferenceSetting("alignment.train.batch_size", 5, ALIGN_SCRIPT,
                     "--per_device_train_batch_size 5"),
    ReferenceSetting("alignment.train.weight_decay", 0.1, ALIGN_SCRIPT, "--weight_decay 0.1"),
    ReferenceSetting("alignment.train.schedule", "cosine", ALIGN_SCRIPT,
                     "--lr_scheduler_type cosine"),
    ReferenceSetting("alignment.train.warmup_ratio", 0.1, ALIGN_SCRIPT, "--warmup_ratio 0.1"),
    *lora_settings("alignment"),
)


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


@torch.no_grad()
def add_to_grads(params: list[torch.nn.Parameter], extra: list[torch.Tensor], scale: float
                 ) -> None:
    """``.grad += scale · extra`` (in the parameter's dtype; ``.grad`` None counts as zeros),
    the sum ``ExtraPasses`` forms (earlier + this backward + scale · extra) without setting the
    earlier gradients aside: the backward has already added to them."""
    scaled = [(scale * e).to(p.dtype) for p, e in zip(params, extra)]
    have = [i for i, p in enumerate(params) if p.grad is not None]
    if have:
        torch._foreach_add_([params[i].grad for i in have], [scaled[i] for i in have])
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = scaled[i]


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
    stages, resume_attributes, multi_process = (FINETUNE,), ("trace",), True
    needs_alignment_data = True
    reference_settings = REFERENCE_SETTINGS

    @dataclass
    class Options:
        lamb: float = 1e9  # λ (script/EWC_finetune/*.sh: lamb 1e9)
        # alignment_adapter (continue it; F over its factors) | weights (ΔW = s·B·A of a
        # fresh LoRA) | trainable (the fresh LoRA's factors)
        space: str = "alignment_adapter"
        fisher_rows: int | None = 2000  # alignment rows for F (reference: its 2000-row set)
        fisher_batch_size: int | None = 5  # reference eval batch size 5; None: the stage's

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
        self.params: list[torch.nn.Parameter] = []  # spaces alignment_adapter, trainable
        self.start: list[torch.Tensor] = []  # their values at the start of the stage
        self.layers: list[AdaptedLinear] = []  # space weights
        self.start_delta: list[torch.Tensor | None] = []  # s·B·A at the start (None: zero)
        self.fisher: list[torch.Tensor] = []
        self.space = o.space
        self.fisher_info: dict[str, object] = {}
        self.trace: list[dict[str, float]] = []  # penalty per micro-batch

    def continues_alignment_adapter(self) -> bool:
        return self.options.space == "alignment_adapter"

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
            with progress(-(-len(items) // size), "ewc fisher", unit="batch",
                          enabled=trainer.accelerator.is_main_process) as bar:
                for start in range(trainer.rank * size, len(items), size * trainer.world):
                    yield collate(items[start : start + size], trainer.pad_id).to(trainer.device)
                    bar.update(trainer.world)

        model = trainer.accelerator.unwrap_model(trainer.model)
        # Under full fine-tuning the weights are the trainable parameters: one space.
        self.space = self.options.space if is_peft(model) else "trainable"
        # alignment_adapter: the trainable factors are the continued alignment LoRA's
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
        self.fisher = [trainer.sum_across(f) for f in self.fisher]  # each process's batches
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
        """(λ·Σ F (w − w_init)², the parameters, the penalty's gradient for each), float32.
        The per-tensor sums are read back once (one ``tolist``) and added in the same order
        as a Python loop would."""
        lamb = self.options.lamb
        if self.space != "weights":
            diffs = torch._foreach_sub([p.float() for p in self.params], self.start)
            weighted = torch._foreach_mul(self.fisher, diffs)
            sums = torch.stack([(w * d).sum() for w, d in zip(weighted, diffs)]).tolist()
            value = sum((lamb * s for s in sums), 0.0)
            return value, self.params, torch._foreach_mul(weighted, 2 * lamb)
        params: list[torch.nn.Parameter] = []
        grads = []
        sums = []
        for layer, fisher, start in zip(self.layers, self.fisher, self.start_delta):
            delta = delta_weight(layer)
            if start is not None:
                delta = delta - start
            weighted = fisher * delta
            sums.append((weighted * delta).sum())
            factor = 2 * lamb * layer.scaling
            params += [layer.lora_B, layer.lora_A]
            grads += [factor * weighted @ layer.lora_A.float().T,
                      factor * layer.lora_B.float().T @ weighted]
        value = sum((lamb * s for s in torch.stack(sums).tolist()), 0.0) if sums else 0.0
        return value, params, grads

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        value, params, grads = self.penalty()  # at w, before this micro-batch's backward
        ce = trainer.compute_loss(batch)
        trainer.backward(ce)
        add_to_grads(params, grads, trainer.shard_weight / trainer.cfg.grad_accum)
        self.trace.append({"ewc_penalty": value})
        return {"loss": float(ce.detach()), "ewc_penalty": value}

    def report(self, stage: str) -> dict[str, object]:
        """How the Fisher was computed, and the penalty λ·Σ F (w − w_init)² averaged over the
        first and last tenth of the stage (it grows as the weights leave the aligned ones)."""
        if stage != FINETUNE or not self.trace:
            return {}
        return {**self.fisher_info, **first_last_means(self.trace)}
