"""Booster: attenuate harmful perturbation in the alignment stage (Huang et al. 2024,
arXiv 2409.01586).

Harmful fine-tuning works because one step on harmful data lowers the harmful loss a lot.
Booster adds a regulariser to alignment that makes that step useless:

    min_w  f(w) + λ · ( h(w) − h(w − α · ∇h(w) / ‖∇h(w)‖) )

with f the alignment loss and h the loss on the provider's harmful QA. Its gradient (with the
first-order treatment of the reference, the perturbed point's gradient taken as is) is

    ∇f(w) + λ · ( ∇h(w) − ∇h(w') ),   w' = w − α · g_h / ‖g_h‖,   g_h = ∇h(w),

all three recomputed on every micro-batch. Follows git-disl/Booster ``trainer.py``
(``BoosterAlignmentTrainer.training_step``, non-perturb-aware branch; ``perturb_aware`` adds
Vaccine's hidden-state perturbation to the alignment pass, as the reference's option does):
harmful batch size 10 (the reference's ``get_harmful_dataloader``), λ = 5, α = 0.1
(``script/alignment/smooth_align.sh``). ‖·‖ is one L2 norm over all trainable parameters.
Departures: the weights are restored by copying the saved values back (the reference adds
α·g/‖g‖ back, equal up to rounding), and gradients accumulated by earlier micro-batches are kept
aside so that ``grad_accum > 1`` composes correctly (the reference folds them into g_h).

Fine-tuning: the reference's fine-tuning scripts (``script/finetune/smooth_*.sh``) pass
``--alternating single_lora``: the user's job keeps training the Booster-aligned LoRA itself (the
SFT baseline, ``sft_poison_ratio.sh``, trains a fresh adapter on the merged aligned model instead).
``single_lora`` (default True) does the same here; ``single_lora: false`` fine-tunes a fresh
``finetune.train.lora`` adapter, as every other defense does.

Data: the provider's harmful QA (``provider_harmful`` in the config; in configs/cpu_sst2.yaml
BeaverTails 30k_train unsafe rows 50-149, 100 rows), disjoint from the user's rows.
Cost: three forward-backward passes per step (four with ``perturb_aware``), about 3× SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense, ReferenceSetting
from hftlab.defenses.common import (
    BatchStream,
    attention_modules,
    first_last_means,
    global_norm,
    provider_harmful_stream,
)
from hftlab.defenses.vaccine import perturbed_step

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer
    from hftlab.train_grads import ExtraPasses


def booster_gradients(
    trainer: SFTTrainer, passes: ExtraPasses, harmful: Batch, lamb: float, alpha: float
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """(λ · (∇h(w) − ∇h(w')) per parameter of ``passes``, losses). The weights are back at w
    and ``.grad`` is empty when this returns."""
    params = passes.params
    loss_h = trainer.compute_loss(harmful)
    grad_h = passes.grads(loss_h)
    norm = global_norm(grad_h) + 1e-7
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():  # one multi-tensor op per arithmetic step, not one per parameter
        shift = torch._foreach_mul(grad_h, alpha)
        if len({s.dtype for s in shift}) == 1:
            torch._foreach_div_(shift, norm.to(shift[0].dtype))
        else:
            shift = [s / norm.to(s.dtype) for s in shift]
        torch._foreach_sub_(params, shift)
    loss_h_shifted = trainer.compute_loss(harmful)
    grad_h_shifted = passes.grads(loss_h_shifted)
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
        correction = torch._foreach_sub(grad_h, grad_h_shifted)
        torch._foreach_mul_(correction, lamb)
    stats = {
        "harmful_loss": float(loss_h.detach()),
        "harmful_loss_after_step": float(loss_h_shifted.detach()),
    }
    return correction, stats


@DEFENSES.register("booster")
class Booster(Defense):
    summary = "alignment stage: regularise so a harmful step cannot lower the harmful loss"
    paper = (
        "Huang et al. 2024, Booster: Tackling Harmful Fine-tuning via Attenuating Harmful "
        "Perturbation, arXiv 2409.01586"
    )
    reference = (
        "git-disl/Booster trainer.py (BoosterAlignmentTrainer), script/alignment/smooth_align.sh"
    )
    stages = (ALIGNMENT,)
    multi_process = "its harmful-gradient passes and their norm are not reduced across processes"
    resume_attributes = ("harmful", "trace")
    needs_provider_harmful = True

    reference_settings = (
        ReferenceSetting("defense_args.lamb", 5.0,
                         "git-disl/Booster script/alignment/smooth_align.sh"),
        ReferenceSetting("defense_args.alpha", 0.1,
                         "git-disl/Booster script/alignment/smooth_align.sh"),
        ReferenceSetting("defense_args.harmful_batch_size", 10,
                         "git-disl/Booster trainer.py (get_harmful_dataloader)"),
        ReferenceSetting("defense_args.single_lora", True,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh "
                         "(--alternating single_lora)",
                         "the user's job continues the aligned LoRA; the CPU preset kept a "
                         "fresh adapter"),
        ReferenceSetting("defense_args.perturb_aware", False,
                         "git-disl/Booster script/alignment/smooth_align.sh, train.py"),
        ReferenceSetting("defense_args.rho", 5.0,
                         "git-disl/Booster script/alignment/smooth_align_perturb.sh",
                         "hftlab: Vaccine's ρ 2; acts only with perturb_aware"),
        ReferenceSetting("provider_harmful", "5000 harmful answers of the refusals' prompts",
                         "git-disl/Booster utils.py, smooth_align.sh (bad_sample_num)", "CPU time"),
        ReferenceSetting("alignment.data", "5000 refusals of beavertails_with_refusals_train.json",
                         "git-disl/Booster utils.py (SupervisedDataset), smooth_align.sh",
                         "CPU time; hftlab adds other refusals and benign rows "
                         "(cpu_sst2_ref.yaml)"),
        ReferenceSetting("alignment.train.lr", 0.0005,
                         "git-disl/Booster script/alignment/smooth_align.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("alignment.train.epochs", 20,
                         "git-disl/Booster script/alignment/smooth_align.sh", "CPU time"),
        ReferenceSetting("alignment.train.batch_size", 10,
                         "git-disl/Booster script/alignment/smooth_align.sh",
                         "CPU protocol: batch 8"),
        ReferenceSetting("alignment.train.weight_decay", 0.1,
                         "git-disl/Booster script/alignment/smooth_align.sh",
                         "CPU protocol: no weight decay"),
        ReferenceSetting("alignment.train.schedule", "constant",
                         "git-disl/Booster script/alignment/smooth_align.sh"),
        ReferenceSetting("alignment.train.warmup_ratio", 0.0,
                         "git-disl/Booster script/alignment/smooth_align.sh"),
        ReferenceSetting("alignment.train.max_length", 256,
                         "git-disl/Booster train.py (model_max_length)"),
        ReferenceSetting("alignment.train.lora.r", 32, "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("alignment.train.lora.alpha", 4, "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("alignment.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("alignment.train.lora.dropout", 0.0,
                         "git-disl/Booster train.py (LoraConfig)"),
        ReferenceSetting("finetune.n", 1000,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh", "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.1,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh"),
        ReferenceSetting("finetune.train.lr", 1e-5,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh",
                         "calibrated: 1e-5 does not move the 135M model in 100 steps"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh", "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 10,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh",
                         "CPU protocol: batch 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.0,
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh",
                         "effective value: HF's constant schedule ignores the script's "
                         "--warmup_ratio 0.1"),
        ReferenceSetting("finetune.train.schedule", "constant",
                         "git-disl/Booster script/finetune/smooth_poison_ratio.sh"),
        ReferenceSetting("finetune.train.max_length", 256,
                         "git-disl/Booster train.py (model_max_length)"),
        ReferenceSetting("finetune.train.lora.r", 32,
                         "git-disl/Booster train.py (LoraConfig), smooth_poison_ratio.sh",
                         "single_lora: the alignment LoRA keeps training; CPU: r 8, α 16, "
                         "all linear"),
        ReferenceSetting("finetune.train.lora.alpha", 4,
                         "git-disl/Booster train.py (LoraConfig), smooth_poison_ratio.sh",
                         "single_lora: the alignment LoRA keeps training; CPU: r 8, α 16, "
                         "all linear"),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         "git-disl/Booster train.py (LoraConfig), smooth_poison_ratio.sh",
                         "single_lora: the alignment LoRA keeps training; CPU: r 8, α 16, "
                         "all linear"),
        ReferenceSetting("finetune.train.lora.dropout", 0.0,
                         "git-disl/Booster train.py (LoraConfig), smooth_poison_ratio.sh"),
    )

    @dataclass
    class Options:
        lamb: float = 5.0  # λ, weight of the harmful-perturbation regulariser (reference: 5)
        alpha: float = 0.1  # α, step size of the simulated harmful step (reference: 0.1)
        harmful_batch_size: int = 10  # reference harmful dataloader batch size
        perturb_aware: bool = False  # reference option: Vaccine perturbation on the f pass
        rho: float = 2.0  # perturbation radius when perturb_aware (Vaccine's default)
        # fine-tuning keeps training the aligned LoRA (reference --alternating single_lora)
        single_lora: bool = True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.harmful_batch_size < 1:
            raise ConfigError("defense_args.harmful_batch_size of 'booster' must be >= 1")
        self.harmful: BatchStream | None = None
        self.trace: list[dict[str, float]] = []  # h(w), h(w') per micro-batch

    def continues_alignment_adapter(self) -> bool:
        return self.options.single_lora

    def cache_key(self, stage: str) -> dict[str, object] | None:
        """``single_lora`` acts in fine-tuning only (the fine-tuning key records it): the
        alignment it shares with ``single_lora: false`` is one checkpoint."""
        key = super().cache_key(stage)
        if key is not None:
            key["options"] = {k: v for k, v in key["options"].items() if k != "single_lora"}
        return key

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage == ALIGNMENT:
            self.harmful = provider_harmful_stream(
                trainer, self.options.harmful_batch_size, self.name
            )
            self.trace = []

    def report(self, stage: str) -> dict[str, object]:
        """h(w) and h(w') averaged over the first and last tenth of the stage: Booster works
        when the simulated harmful step stops lowering the harmful loss."""
        if stage != ALIGNMENT or not self.trace:
            return {}
        return first_last_means(self.trace)

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        assert self.harmful is not None
        with trainer.extra_passes() as passes:
            correction, stats = booster_gradients(
                trainer, passes, self.harmful.next(), self.options.lamb, self.options.alpha
            )
            if self.options.perturb_aware:
                result = perturbed_step(trainer, batch, attention_modules(trainer.model),
                                        self.options.rho)
            else:
                loss = trainer.compute_loss(batch)
                trainer.backward(loss)
                result = {"loss": float(loss.detach())}
            passes.add(correction, 1.0 / trainer.cfg.grad_accum)
        self.trace.append(stats)
        return {**result, **stats}
