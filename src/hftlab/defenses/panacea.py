"""Panacea: an adaptive perturbation optimised during fine-tuning and added after it (Wang et al.
2025, arXiv 2501.18100).

Adding a random perturbation to a harmfully fine-tuned model restores much of its safety but
costs task accuracy. Panacea learns the perturbation instead: while the user's data is trained
on, a perturbation ε of the trainable weights is chosen to raise the loss h on the provider's
harmful QA, and the weights are trained so that this rise is large while the task loss f stays
low:

    min_w  f(w) − λ · ( h(w + ε) − h(w) ),   ε = ρ · ∇h(w) / ‖∇h(w)‖   (one ascent step),

with h(w + ε) clamped from above at ``harmful_loss_max``. Every micro-batch, in the reference's
order: ∇f(w) on the user's batch; ∇h(w) on a harmful batch; ε from it (ONE L2 norm over all
trainable parameters, + 1e-7); weights moved to w + ε; ∇ of min(h(w + ε), max) on the same
harmful batch; weights back at w; the applied gradient is

    ∇f(w) − λ · ( ∇min(h(w + ε), max) − ∇h(w) ).

ε is recomputed from scratch at every step (it is not accumulated: ‖ε‖ = ρ throughout); the
one deployed is the last step's (computed at the weights before the final optimizer update, as
in the reference). After fine-tuning, ``post_finetune`` adds it to the trainable weights: under
LoRA to the adapter's A and B factors (what the reference perturbs), under full fine-tuning to
every weight.

Which adapter fine-tuning trains (option ``single_lora``). The reference script runs
``--alternating single_lora``: ``train.py`` then loads the alignment LoRA (r 32, α 4 on q/k/v,
no dropout) with ``is_trainable=True`` and does not merge it, so fine-tuning keeps training the
alignment adapter itself, ε perturbs its A and B, and the served model is base + (alignment
adapter, fine-tuned) + ε. That is the default here (``single_lora: true``, reported by
``continues_alignment_adapter``): the fine-tuning stage loads the alignment adapter unmerged and
trainable (``stage_models.aligned_adapter_model``) and saves it as its own adapter, on the base
model; ``post_finetune`` receives base + that adapter, unmerged. Both stages must then use LoRA
with the same settings (``context.check_continued_adapter`` raises a ConfigError otherwise).
``single_lora: false`` is the reference's other branch (merge the alignment adapter, attach a
fresh LoRA): a fresh ``finetune.train.lora`` adapter on the merged aligned model, ε over that
adapter, or over every weight under full fine-tuning.

Follows w-yibo/Panacea ``trainer.py`` (``Panacea.training_step`` / ``step_eps``, tag ``eps``;
its harmful dataloader is ``BoosterAlignmentTrainer.get_harmful_dataloader``, batch size 10) and
``train.py`` (``first_lora_trainable`` under ``single_lora``; after ``trainer.train()``,
``param.data += epsilon[name]`` for every trainable parameter when ``add_eps``). Defaults:
λ = 0.001 and ρ = 1 (``script/finetune/panacea_gsm8k.sh``: ``lamb=0.001``, ``eps_rho=1``; also
``train.py``'s argument defaults), the clamp of h(w + ε) at 5 (``torch.clamp(loss_h, max=5)``),
harmful batch size 10, ``single_lora``. The reference run's other settings (learning rate,
epochs, LoRA, data) are listed in ``Panacea.reference_settings``.
Harmful data: the reference uses 1000 BeaverTails unsafe rows from index 5000
(``bad_sample_num=1000``), disjoint from the user's poison rows; here the provider's harmful QA
(``provider_harmful`` in the config).

Keeping ε between stages: the finetune stage writes ε to ``finetune/panacea_epsilon.safetensors``
(name → tensor, plus the stage's trace summary as metadata) at every micro-batch of the LAST
optimizer step (``trainer.step == trainer.total_steps − 1``; the last write holds the deployed
ε). This happens before the stage saves its model and writes stage.json, so a finished finetune
stage always has its ε, and an interrupted one is rerun whole. ``post_finetune`` always reads ε
from that file, in the same process or a resumed one.

Departures, and why:

- the released ``step_eps`` backpropagates ``clip_loss_h``, a name it never defines (it would
  raise NameError); the clamped ``loss_h`` computed on the line before is what is meant and what
  is backpropagated here;
- weights are restored by copying the saved values back (the reference subtracts ε: equal up to
  rounding), so the step leaves them bit-for-bit unchanged;
- gradients of earlier micro-batches of the same optimizer step are kept aside and each
  micro-batch's Panacea gradient is divided by ``grad_accum`` (the reference overwrites
  ``.grad``, correct only for its ``gradient_accumulation_steps 1``);
- the step's reported ``loss`` is the task loss f(w) (the reference's training_step returns
  the clamped h(w + ε)); h(w), h(w + ε) and ‖ε‖ are traced and reported;
- ε is applied in the post-fine-tuning stage from the saved file (the reference adds it in the
  same process right after training); the resulting weights are the same;
- ``eps_lr`` (``train.py``, 1e-4) is parsed by the reference but not read by its Panacea step,
  so it is not an option; the model's learning rate η is ``finetune.train.lr``;
- the released ``train.py`` builds the trainer as ``Pancacea(...)`` (a misspelling of the class
  ``Panacea``: NameError as released); the class it means is what is followed;
- with ``single_lora: false``, full fine-tuning is accepted (ε over every trainable weight; the
  saved ε is then as large as the model); the reference is LoRA-only;
- the reference's run settings (lr 2e-5, 20 epochs, batch 10, weight decay 0.1, the r 32 α 4
  q/k/v adapter) are the config's, not defense options: ``Panacea.reference_settings`` lists
  them beside hftlab's values (``lora: {preset: reference}`` in both stages gives the adapter).

Reports: ``finetune``: h(w), h(w + ε) (unclamped) and ‖ε‖ averaged over the first and last
tenth of the micro-batches. ``post_finetune``: ‖ε‖, ‖ε‖ per decoder block (the paper's
layer-wise analysis), the token-mean harmful loss of the fine-tuned model over every
provider harmful row before and after adding ε, and the finetune stage's trace summary.

Cost: three forward-backward passes per micro-batch (f, h(w), h(w + ε)), about 3× SFT, and two
copies of the trainable weights' size (ε and the saved weights) besides the gradients.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import (
    DEFENSES,
    FINETUNE,
    POST_FINETUNE,
    Defense,
    ReferenceSetting,
)
from hftlab.defenses.common import (
    BatchStream,
    first_last_means,
    global_norm,
    provider_harmful_stream,
)
from hftlab.defenses.weights import layer_index, plain_name
from hftlab.utils import shareable

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.train import Batch, SFTTrainer
    from hftlab.train_grads import ExtraPasses

EPSILON_FILE = "panacea_epsilon.safetensors"
SCRIPT = "w-yibo/Panacea script/finetune/panacea_gsm8k.sh"
ALIGN_SCRIPT = "w-yibo/Panacea script/alignment/sft.sh"
TRAIN_PY = "w-yibo/Panacea train.py"


def lora_settings(stage: str) -> tuple[ReferenceSetting, ...]:
    """The reference's LoRA for ``stage``: train.py's first (alignment) adapter, r 32,
    lora_alpha 4, q/k/v, dropout 0, which single_lora keeps training in fine-tuning."""
    note = "the alignment adapter, continued: both stages use it (lora: {preset: reference})"
    values = (("r", 32), ("alpha", 4), ("target_modules", ["q_proj", "k_proj", "v_proj"]),
              ("dropout", 0.0))
    return tuple(ReferenceSetting(f"{stage}.train.lora.{key}", value, TRAIN_PY, note)
                 for key, value in values)


REFERENCE_SETTINGS = (
    ReferenceSetting("defense_args.lamb", 0.001, SCRIPT, "lamb=0.001"),
    ReferenceSetting("defense_args.rho", 1.0, SCRIPT, "eps_rho=1"),
    ReferenceSetting("defense_args.harmful_loss_max", 5.0, "w-yibo/Panacea trainer.py",
                     "Panacea.training_step: torch.clamp(loss_h, max=5)"),
    ReferenceSetting("defense_args.harmful_batch_size", 10, "w-yibo/Panacea trainer.py",
                     "BoosterAlignmentTrainer.get_harmful_dataloader: batch_size 10"),
    ReferenceSetting("defense_args.single_lora", True, SCRIPT,
                     "--alternating single_lora: train.py loads the alignment LoRA with "
                     "is_trainable=True, unmerged, and fine-tuning continues it"),
    ReferenceSetting("defense_args.add_eps", True, TRAIN_PY, "--add_eps default 'True'"),
    ReferenceSetting("finetune.train.lr", 2e-5, SCRIPT, "lr=2e-5"),
    ReferenceSetting("finetune.train.epochs", 20, SCRIPT, "--num_train_epochs 20"),
    ReferenceSetting("finetune.train.batch_size", 10, SCRIPT, "--per_device_train_batch_size 10"),
    ReferenceSetting("finetune.train.grad_accum", 1, SCRIPT, "--gradient_accumulation_steps 1"),
    ReferenceSetting("finetune.train.weight_decay", 0.1, SCRIPT, "--weight_decay 0.1"),
    ReferenceSetting("finetune.train.schedule", "constant", SCRIPT,
                     "--lr_scheduler_type constant"),
    ReferenceSetting("finetune.train.warmup_ratio", 0.0, SCRIPT,
                     "the script passes --warmup_ratio 0.1, which HF's 'constant' scheduler "
                     "ignores (hftlab's constant schedule would warm up)"),
    *lora_settings("finetune"),
    ReferenceSetting("finetune.n", 1000, SCRIPT, "sample_num=1000"),
    ReferenceSetting("finetune.poison_ratio", 0.1, SCRIPT, "poison_ratio=${1:-0.1}"),
    ReferenceSetting("provider_harmful", "BeaverTails unsafe rows 5001-5999", TRAIN_PY,
                     "bad_sample_num=1000 from poison_data_start=5000 of "
                     "data/beavertails_with_refusals_train.json (utils.py keeps "
                     "5000 < index < 6000: 999 rows)"),
    ReferenceSetting("alignment.data", "BeaverTails refusals, rows 5001-9999", ALIGN_SCRIPT,
                     "--sample_num 5000 of data/beavertails_with_refusals_train.json from "
                     "poison_data_start=5000 (utils.py SupervisedDataset, BeaverTails_safe)"),
    ReferenceSetting("alignment.train.lr", 5e-4, ALIGN_SCRIPT, "--learning_rate 5e-4"),
    ReferenceSetting("alignment.train.epochs", 20, ALIGN_SCRIPT, "--num_train_epochs 20"),
    ReferenceSetting("alignment.train.batch_size", 10, ALIGN_SCRIPT,
                     "--per_device_train_batch_size 10"),
    ReferenceSetting("alignment.train.weight_decay", 0.1, ALIGN_SCRIPT, "--weight_decay 0.1"),
    ReferenceSetting("alignment.train.schedule", "constant", ALIGN_SCRIPT,
                     "--lr_scheduler_type constant, --warmup_ratio 0"),
    *lora_settings("alignment"),
)


def ascent_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ε = ρ · g / (‖g‖ + 1e-7), one L2 norm over all tensors (reference ``step_eps``)."""
    scale = rho / (global_norm(grads) + 1e-7)
    return [(g * scale.to(g.dtype)).detach() for g in grads]


def trainable_named(trainer: SFTTrainer) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Names (as in the unwrapped model, so they match the model ``post_finetune`` receives)
    and the trainable parameters, in the optimizer's order."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def panacea_gradients(
    trainer: SFTTrainer, passes: ExtraPasses, batch: Batch, harmful: Batch, lamb: float,
    rho: float, harmful_loss_max: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """(∇f(w) − λ(∇min(h(w+ε), max) − ∇h(w)) per parameter of ``passes``, ε, stats) for one
    micro-batch, undivided by grad_accum. Weights are back at w and ``.grad`` is empty when it
    returns."""
    params = passes.params
    loss_f = trainer.compute_loss(batch)
    grad_f = passes.grads(loss_f)
    loss_h = trainer.compute_loss(harmful)
    grad_h = passes.grads(loss_h)
    eps = ascent_perturbation(grad_h, rho)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():  # one multi-tensor op per arithmetic step, not one per parameter
        torch._foreach_add_(params, eps)
    loss_h_eps = trainer.compute_loss(harmful)
    grad_h_eps = passes.grads(torch.clamp(loss_h_eps, max=harmful_loss_max))
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
        rise = torch._foreach_sub(grad_h_eps, grad_h)
        torch._foreach_mul_(rise, lamb)
        applied = torch._foreach_sub(grad_f, rise)
    stats = {
        "loss": float(loss_f.detach()),
        "harmful_loss": float(loss_h.detach()),
        "harmful_loss_perturbed": float(loss_h_eps.detach()),
        "epsilon_norm": float(global_norm(eps)),
    }
    return applied, eps, stats


def save_epsilon(path: Path, epsilon: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    """Write ε (and ``summary`` as metadata) to ``path`` atomically: never half-written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        shareable(tmp)
        tensors = {n: e.detach().cpu().contiguous() for n, e in epsilon.items()}
        save_file(tensors, tmp, metadata={"summary": json.dumps(summary)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_epsilon(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(ε by parameter name, the finetune stage's summary) from :func:`save_epsilon`."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"defense 'panacea': {path} is missing; the finetune stage writes it at its last "
            "step. Rerun the run with --force (or delete its finetune folder)"
        )
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = handle.metadata() or {}
    return tensors, json.loads(meta.get("summary", "{}"))


def norms_by_layer(epsilon: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖ε‖ of each decoder block's parameters ("other": outside the blocks)."""
    squares: dict[str, float] = {}
    for name, e in epsilon.items():
        index = layer_index(plain_name(name))
        key = "other" if index is None else str(index)
        squares[key] = squares.get(key, 0.0) + float(e.double().pow(2).sum())
    order = sorted(squares, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {k: float(f"{squares[k] ** 0.5:.6g}") for k in order}


@DEFENSES.register("panacea")
class Panacea(Defense):
    summary = ("fine-tuning: learn a weight perturbation ε that raises the harmful loss; "
               "post-fine-tuning: add ε")
    paper = (
        "Wang et al. 2025, Panacea: Mitigating Harmful Fine-tuning for Large Language Models via "
        "Post-fine-tuning Perturbation, arXiv 2501.18100"
    )
    reference = (
        "w-yibo/Panacea trainer.py (Panacea.training_step), train.py (add_eps), "
        "script/finetune/panacea_gsm8k.sh"
    )
    stages = (FINETUNE, POST_FINETUNE)
    multi_process = "its perturbation ε, a harmful gradient, is not reduced across processes"
    resume_attributes = ("harmful", "trace", "epsilon")
    needs_provider_harmful = True
    reference_settings = REFERENCE_SETTINGS

    @dataclass
    class Options:
        lamb: float = 0.001  # λ, weight of the harmful-loss-increase term (reference: 0.001)
        rho: float = 1.0  # ‖ε‖, the perturbation intensity (reference eps_rho: 1)
        harmful_loss_max: float = 5.0  # clamp of h(w + ε) from above (reference: 5)
        harmful_batch_size: int = 10  # reference harmful dataloader batch size
        add_eps: bool = True  # add ε after fine-tuning (reference --add_eps True)
        # keep training the alignment LoRA (reference --alternating single_lora); false: a
        # fresh finetune.train adapter on the merged aligned model
        single_lora: bool = True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        opts = self.options
        if opts.lamb < 0:
            raise ConfigError("defense_args.lamb of 'panacea' must be >= 0")
        if opts.rho <= 0:
            raise ConfigError("defense_args.rho of 'panacea' must be > 0")
        if opts.harmful_loss_max <= 0:
            raise ConfigError("defense_args.harmful_loss_max of 'panacea' must be > 0")
        if opts.harmful_batch_size < 1:
            raise ConfigError("defense_args.harmful_batch_size of 'panacea' must be >= 1")
        self.harmful: BatchStream | None = None
        self.trace: list[dict[str, float]] = []  # h(w), h(w + ε), ‖ε‖ per micro-batch
        self.epsilon: dict[str, torch.Tensor] = {}  # the latest ε, by parameter name
        self.epsilon_path: Path | None = None
        self.is_main = True
        self._post_report: dict[str, Any] = {}

    def continues_alignment_adapter(self) -> bool:
        return self.options.single_lora

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != FINETUNE:
            return
        self.harmful = provider_harmful_stream(trainer, self.options.harmful_batch_size,
                                               self.name)
        self.trace = []
        self.epsilon = {}
        folder = trainer.run.folder
        self.epsilon_path = folder / EPSILON_FILE if folder is not None else None
        self.is_main = trainer.run.is_main

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        assert self.harmful is not None
        names, params = trainable_named(trainer)
        opts = self.options
        with trainer.extra_passes(params) as passes:
            applied, eps, stats = panacea_gradients(
                trainer, passes, batch, self.harmful.next(), opts.lamb, opts.rho,
                opts.harmful_loss_max,
            )
            passes.add(applied, 1.0 / trainer.cfg.grad_accum)
        self.epsilon = dict(zip(names, eps))
        self.trace.append({k: v for k, v in stats.items() if k != "loss"})
        if trainer.step == trainer.total_steps - 1 and self.epsilon_path and self.is_main:
            # the last optimizer step: each micro-batch overwrites, the last one is deployed
            save_epsilon(self.epsilon_path, self.epsilon, self.trace_summary())
        return stats

    def trace_summary(self) -> dict[str, float]:
        return first_last_means(self.trace) if self.trace else {}

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        epsilon, finetune_summary = load_epsilon(ctx.stage_dir(FINETUNE) / EPSILON_FILE)
        params = dict(model.named_parameters())
        missing = sorted(set(epsilon) - set(params))
        if missing:
            raise ValueError(
                f"defense 'panacea': the saved ε names parameters the fine-tuned model lacks "
                f"(e.g. {missing[0]}); was finetune.train changed after the finetune stage?"
            )
        items = ctx.tokenize(ctx.data.provider_harmful, ctx.config.finetune.train.max_length)
        before = self._harmful_loss(model, items, ctx)
        if self.options.add_eps:
            with torch.no_grad():
                for name, e in epsilon.items():
                    p = params[name]
                    p.add_(e.to(device=p.device, dtype=p.dtype))
        after = self._harmful_loss(model, items, ctx)
        self._post_report = {
            "epsilon_added": self.options.add_eps,
            "epsilon_norm": float(f"{float(global_norm(list(epsilon.values()))):.6g}"),
            "epsilon_norm_by_layer": norms_by_layer(epsilon),
            "parameters_perturbed": len(epsilon) if self.options.add_eps else 0,
            "harmful_loss_before": before,
            "harmful_loss_after": after,
            "harmful_rows": len(items),
            "finetune": finetune_summary,
        }
        return model

    def _harmful_loss(self, model: torch.nn.Module, items: list, ctx: RunContext) -> float | None:
        """Token-mean loss of ``model`` on the provider's harmful rows (None: no rows)."""
        from hftlab.train import mean_loss

        if not items:
            return None
        loss = mean_loss(model, items, ctx.tokenizer.pad_token_id,
                         self.options.harmful_batch_size, ctx.device, ctx.autocast)
        return float(f"{loss:.6g}")

    def report(self, stage: str) -> dict[str, Any]:
        if stage == FINETUNE:
            return self.trace_summary()
        if stage == POST_FINETUNE:
            return dict(self._post_report)
        return {}
