"""Vaccine: perturbation-aware alignment (Huang et al. 2024, arXiv 2402.01109).

Harmful fine-tuning shifts the hidden embeddings of the aligned model ("harmful embedding
drift"). Vaccine aligns the model to stay safe under the worst such shift of bounded size: a
SAM-style min-max over the hidden states, not the weights. Every micro-batch of alignment data:

1. forward and backward, keeping g_l = d loss / d h_l, the gradient at the output h_l of each
   hooked module (reference: every block's self-attention module);
2. ε_l = ρ · g_l / ‖g‖ with ONE norm over all layers together (‖g‖² = Σ_l ‖g_l‖²);
3. forward again with h_l + ε_l at each hooked module, backward, and step with that gradient.

Follows git-disl/Vaccine ``trainer.py`` (``BaseTrainer.training_step``, ``pre_first_step``,
``after_first_step``, ``pre_second_step``): the hooked modules are the ``LlamaAttention`` (and
OPT/Mistral/Qwen/Gemma attention) modules and the perturbation is added to their first output;
the gradient of the first pass only builds ε (its parameter gradients are discarded); ρ = 2 as
in the reference scripts (``script/alignment/vaccine.sh``). ``perturb: block`` perturbs each
decoder block's output instead (the paper's wording, "each layer's hidden embedding").

Cost: two forward-backward passes per step (the first needs gradients only with respect to the
hidden states), so about 2× plain SFT. Vaccine uses only the alignment data (no harmful data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense, ReferenceSetting
from hftlab.defenses.common import (
    add_to_outputs,
    attention_modules,
    decoder_layers,
    global_norm,
    record_outputs,
)

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

PERTURB_TARGETS = ("attention", "block")


def perturbation(grads: list[torch.Tensor], rho: float,
                 sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """ε_l = ρ · g_l / (‖g‖ + 1e-7), one norm over every layer's gradient (reference
    ``after_first_step``). ``sum_across``: data-parallel, the squared norm of each process's
    rows summed over the processes (the norm of the whole batch's gradient)."""
    norm = global_norm(grads)
    if sum_across is not None:
        norm = sum_across(norm.square()).sqrt()
    scale = rho / (norm + 1e-7)
    return [g * scale.to(g.dtype) for g in grads]


def output_gradients(
    trainer: SFTTrainer, batch: Batch, modules: list[torch.nn.Module]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(loss, d loss / d output of each module) for one forward pass; parameter gradients are
    not computed (the reference computes and then discards them)."""
    with record_outputs(modules) as outputs:
        loss = trainer.compute_loss(batch)
    live = [i for i, out in enumerate(outputs) if out is not None and out.requires_grad]
    if not live:
        raise ConfigError(
            "the perturbed modules' outputs do not depend on any trainable parameter; "
            "train (e.g. put LoRA on) modules at or before them"
        )
    grads = torch.autograd.grad(loss, [outputs[i] for i in live])
    full: list[torch.Tensor | None] = [None] * len(modules)
    for index, grad in zip(live, grads):
        full[index] = grad.detach()
    return loss.detach(), full


def perturbed_step(
    trainer: SFTTrainer, batch: Batch, modules: list[torch.nn.Module], rho: float
) -> dict[str, float]:
    """One Vaccine micro-batch on ``modules``: gradient at their outputs, ε, perturbed
    forward-backward (gradient left in ``.grad``). Shared with T-Vaccine."""
    clean_loss, grads = output_gradients(trainer, batch, modules)
    present = [g for g in grads if g is not None]
    if trainer.world > 1:  # this process's rows of the whole batch's (token-mean) gradient
        present = [g * trainer.shard_weight for g in present]
    eps_present = iter(perturbation(present, rho, trainer.sum_across if trainer.world > 1
                                    else None))
    eps = [next(eps_present) if g is not None else None for g in grads]
    with add_to_outputs(modules, eps):
        loss = trainer.compute_loss(batch)
    trainer.backward(loss)
    return {"loss": float(loss.detach()), "clean_loss": float(clean_loss)}


@DEFENSES.register("vaccine")
class Vaccine(Defense):
    summary = "alignment stage: align under the worst-case hidden-embedding perturbation (ρ)"
    paper = "Huang et al. 2024, Vaccine: Perturbation-aware Alignment, arXiv 2402.01109"
    reference = "git-disl/Vaccine trainer.py (BaseTrainer), script/alignment/vaccine.sh"
    stages = (ALIGNMENT,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.rho", 2.0,
                         "git-disl/Vaccine README.md (Vaccine.sh 2), train.py --rho"),
        ReferenceSetting("defense_args.perturb", "attention",
                         "git-disl/Vaccine trainer.py (hooks on LlamaAttention)"),
        ReferenceSetting("alignment.data", "2000 BeaverTails is_safe pairs",
                         "git-disl/Vaccine train.py (SupervisedDataset)",
                         "hftlab: paired refusals; CPU time"),
        ReferenceSetting("alignment.train.lr", 0.001,
                         "git-disl/Vaccine script/alignment/Vaccine.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("alignment.train.epochs", 50,
                         "git-disl/Vaccine script/alignment/Vaccine.sh", "CPU time"),
        ReferenceSetting("alignment.train.batch_size", 5,
                         "git-disl/Vaccine script/alignment/Vaccine.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("alignment.train.weight_decay", 0.1,
                         "git-disl/Vaccine script/alignment/Vaccine.sh",
                         "CPU protocol: no weight decay"),
        ReferenceSetting("alignment.train.warmup_ratio", 0.1,
                         "git-disl/Vaccine script/alignment/Vaccine.sh", "hftlab: no warm-up"),
        ReferenceSetting("alignment.train.schedule", "cosine",
                         "git-disl/Vaccine script/alignment/Vaccine.sh",
                         "hftlab: constant (Booster's scripts)"),
        ReferenceSetting("alignment.train.max_length", 200,
                         "git-disl/Vaccine train.py (model_max_length)",
                         "hftlab: 256 (Booster's train.py)"),
        ReferenceSetting("alignment.train.lora.r", 8, "git-disl/Vaccine train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.alpha", 4, "git-disl/Vaccine train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.target_modules",
                         ["q_proj", "k_proj", "v_proj", "o_proj",
                          "up_proj", "down_proj", "gate_proj"],
                         "git-disl/Vaccine train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.dropout", 0.1,
                         "git-disl/Vaccine train.py (LoraConfig)", "hftlab: no dropout"),
        ReferenceSetting("finetune.n", 1000, "git-disl/Vaccine README.md (sst2.sh 2 0.1 1000)",
                         "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.1,
                         "git-disl/Vaccine README.md (sst2.sh 2 0.1 1000)"),
        ReferenceSetting("finetune.train.lr", 1e-5,
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh",
                         "calibrated: 1e-5 does not move the 135M model in 100 steps"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh", "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.1,
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh", "hftlab: no warm-up"),
        ReferenceSetting("finetune.train.schedule", "cosine",
                         "git-disl/Vaccine script/vaccine_finetune/sst2.sh",
                         "hftlab: constant (Booster's scripts)"),
        ReferenceSetting("finetune.train.max_length", 200,
                         "git-disl/Vaccine train.py (model_max_length)",
                         "hftlab: 256 (Booster's train.py)"),
        ReferenceSetting("finetune.train.lora.r", 8, "git-disl/Vaccine train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.alpha", 1,
                         "git-disl/Vaccine train.py (lora_alpha 1 for SST-2)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.target_modules",
                         ["q_proj", "k_proj", "v_proj", "o_proj",
                          "up_proj", "down_proj", "gate_proj"],
                         "git-disl/Vaccine train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.dropout", 0.1,
                         "git-disl/Vaccine train.py (LoraConfig)", "hftlab: no dropout"),
    )

    @dataclass
    class Options:
        rho: float = 2.0  # perturbation radius (reference: 2)
        perturb: str = "attention"  # attention (reference code) | block (decoder block output)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.perturb not in PERTURB_TARGETS:
            raise ConfigError(
                f"defense_args.perturb '{self.options.perturb}' of 'vaccine' must be one of "
                f"{', '.join(PERTURB_TARGETS)}"
            )
        if self.options.rho < 0:
            raise ConfigError("defense_args.rho of 'vaccine' must be >= 0")
        self.modules: list[torch.nn.Module] = []

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage == ALIGNMENT:
            self.modules = perturbed_modules(trainer.model, self.options.perturb)

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        return perturbed_step(trainer, batch, self.modules, self.options.rho)


def perturbed_modules(model: torch.nn.Module, target: str) -> list[torch.nn.Module]:
    return attention_modules(model) if target == "attention" else decoder_layers(model)
