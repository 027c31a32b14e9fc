"""LDIFS: keep the fine-tuned model's intermediate features close to the aligned model's
(Mukhoti et al. 2023, Fine-tuning can cripple your foundation model; preserving features may be
the solution, arXiv 2308.13320), as ported to harmful fine-tuning by git-disl.

The user's fine-tuning objective gets an ℓ2 penalty in feature space, on the user's own batch:

    L = CE(w; x) + Σ_l  ρ/2 · ‖f_l(w; x) − f_l(w_aligned; x)‖²

where f_l is the output of the MLP of decoder block l (every block), ‖·‖² is the sum of squares
over the batch, its tokens and the hidden dimension (no averaging), and w_aligned is the model the
stage starts from: the aligned model (LoRA: the same network with the fresh adapter switched
off; full fine-tuning: a frozen copy made at ``setup``). The aligned features are constants.

Follows git-disl/Booster ``trainer.py`` (``LDIFSTrainer``): forward hooks on
``model.layers.{i}.mlp`` of the trained model and of a deep copy made before fine-tuning (the
aligned model plus the still-zero fresh LoRA), the penalty ``rho/2 * torch.norm(a - a_aligned)**2``
per layer, ρ = 1e-4 (``script/finetune/LDIFS_poison_ratio.sh``, ``LDIFS_sample_number.sh``,
``LDIFS_model.sh``; ``LDIFS_rho.sh`` sweeps it from 1e-3). The reference keeps a layer's term only
when it is below 0.1 ("in some layers the proximal loss will be NAN, drop those overflow loss"):
a layer whose term is not finite or reaches ``max_layer_term`` contributes nothing (no value, no
gradient) on that micro-batch; ``max_layer_term: null`` keeps every finite term.

Departures from the reference, and why:

- Padding positions are left out of the feature distance (the reference's sum runs over every
  position of the padded batch); with hftlab's length-grouped batches the amount of padding is an
  artefact of batching, and the features of pad tokens say nothing about the model.
- The reference clips the gradient to norm 5 after each backward and the HF trainer clips again
  to its ``max_grad_norm`` (default 1.0) before stepping; here only the stage's ``max_grad_norm``
  clipping runs. With grad_accum 1 and max_grad_norm <= 5 the two are identical.
- The reference caps sequences at 256 tokens for LDIFS (``model_max_length=256`` in
  ``train.py``, against out-of-memory errors); here the stage's ``max_length`` applies.

Returned per micro-batch: ``loss`` is the cross-entropy (comparable with the other defenses);
``ldifs_penalty`` the feature penalty that was added and ``layers_kept`` how many layers' terms
passed the threshold. Cost: one extra no-grad forward of the aligned model per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import (
    first_last_means,
    frozen_copy_if_full,
    mlp_modules,
    record_outputs,
    stage_start_model,
)
from hftlab.model import causal_lm_parts

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer


def feature_terms(
    features: list[torch.Tensor], aligned: list[torch.Tensor], mask: torch.Tensor, rho: float
) -> list[torch.Tensor]:
    """ρ/2 · ‖f_l − f_l^aligned‖² per layer, summed over the real tokens (``mask`` = 1) and the
    hidden dimension, in float32."""
    keep = mask.bool()
    return [
        rho / 2 * (f[keep].float() - a[keep].float()).pow(2).sum()
        for f, a in zip(features, aligned)
    ]


def kept_terms(terms: list[torch.Tensor], max_term: float | None) -> list[torch.Tensor]:
    """The terms the reference keeps: finite and (with a threshold) below it (the values read
    back at once, not one synchronisation per layer)."""
    if not terms:
        return []
    values = torch.stack([term.detach() for term in terms]).tolist()
    return [term for term, value in zip(terms, values)
            if math.isfinite(value) and (max_term is None or value < max_term)]


@DEFENSES.register("ldifs")
class LDIFS(Defense):
    summary = "fine-tuning stage: ℓ2 penalty keeping every block's MLP features near the aligned"
    paper = (
        "Mukhoti et al. 2023, Fine-tuning can cripple your foundation model; preserving features "
        "may be the solution, arXiv 2308.13320"
    )
    reference = (
        "git-disl/Booster trainer.py (LDIFSTrainer), script/finetune/LDIFS_poison_ratio.sh"
    )
    stages = (FINETUNE,)
    multi_process = "its feature penalty is a per-batch statistic not reduced across processes"
    reads_stage_start_model = True
    resume_attributes = ("trace",)

    reference_settings = (
        ReferenceSetting("defense_args.rho", 0.0001,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh"),
        ReferenceSetting("defense_args.max_layer_term", 0.1,
                         "git-disl/Booster trainer.py (LDIFSTrainer)"),
        ReferenceSetting("finetune.n", 1000,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh", "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.05,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh",
                         "hftlab: p = 0.1 throughout"),
        ReferenceSetting("finetune.train.lr", 1e-5,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh",
                         "calibrated: 1e-5 does not move the 135M model in 100 steps"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh", "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.0,
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh",
                         "effective value: HF's constant schedule ignores the script's "
                         "--warmup_ratio 0.1"),
        ReferenceSetting("finetune.train.schedule", "constant",
                         "git-disl/Booster script/finetune/LDIFS_poison_ratio.sh"),
        ReferenceSetting("finetune.train.max_length", 256,
                         "git-disl/Booster train.py (model_max_length)"),
        ReferenceSetting("finetune.train.lora.r", 32, "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("finetune.train.lora.alpha", 4, "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         "git-disl/Booster train.py (LoraConfig)",
                         "CPU protocol: r 8, α 16 on all linear layers (scale 2)"),
        ReferenceSetting("finetune.train.lora.dropout", 0.0,
                         "git-disl/Booster train.py (LoraConfig)"),
    )

    @dataclass
    class Options:
        rho: float = 1e-4  # ρ, weight of the feature penalty (LDIFS_*.sh: RHO=0.0001)
        max_layer_term: float | None = 0.1  # reference keeps a layer's term only below 0.1

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.rho < 0:
            raise ConfigError("defense_args.rho of 'ldifs' must be >= 0")
        if self.options.max_layer_term is not None and self.options.max_layer_term <= 0:
            raise ConfigError("defense_args.max_layer_term of 'ldifs' must be > 0 (or null)")
        self.frozen: torch.nn.Module | None = None
        self.modules: list[torch.nn.Module] = []
        self.aligned_modules: list[torch.nn.Module] = []
        self.trace: list[dict[str, float]] = []  # penalty, layers kept per micro-batch

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != FINETUNE:
            return
        self.frozen = frozen_copy_if_full(trainer)
        self.modules = mlp_modules(trainer.accelerator.unwrap_model(trainer.model))
        # With LoRA the aligned model is the same network (adapters off): the same modules.
        self.aligned_modules = mlp_modules(self.frozen) if self.frozen is not None else self.modules
        self.trace = []

    def aligned_features(self, trainer: SFTTrainer, batch: Batch) -> list[torch.Tensor]:
        with stage_start_model(trainer, self.frozen) as aligned:
            body, _ = causal_lm_parts(aligned)
            with record_outputs(self.aligned_modules) as outputs, trainer.autocast():
                body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return [out.detach() for out in outputs if out is not None]

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        aligned = self.aligned_features(trainer, batch)
        with record_outputs(self.modules) as outputs:
            ce = trainer.compute_loss(batch)
        features = [out for out in outputs if out is not None]
        terms = feature_terms(features, aligned, batch.attention_mask, self.options.rho)
        kept = kept_terms(terms, self.options.max_layer_term)
        penalty = torch.stack(kept).sum() if kept else ce.new_zeros(())
        trainer.backward(ce + penalty.to(ce.dtype))
        value = float(penalty.detach())
        self.trace.append({"ldifs_penalty": value, "layers_kept": len(kept)})
        return {"loss": float(ce.detach()), "ldifs_penalty": value, "layers_kept": len(kept)}

    def report(self, stage: str) -> dict[str, object]:
        """The feature penalty and the number of layers whose term was kept, averaged over the
        first and last tenth of the stage: the penalty grows as the features drift, and layers
        drop out once their term reaches ``max_layer_term``."""
        if stage != FINETUNE or not self.trace:
            return {}
        return {"layers": len(self.modules), **first_last_means(self.trace)}
