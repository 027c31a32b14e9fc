"""VLGuard-style safety data mixing during fine-tuning (Zong et al. 2024, Safety Fine-Tuning at
(Almost) No Cost: A Baseline for Vision Large Language Models, arXiv 2402.02207), as ported to
text LLMs in the git-disl harmful fine-tuning repositories.

The provider mixes its safety (alignment) data into the user's fine-tuning job. Every step
trains on the user's batch and on a small batch of alignment data together:

    L(w) = CE(w; x_user) + λ · CE(w; x_align),   ∇ = ∇CE_user + λ · ∇CE_align,

with a fresh alignment batch drawn on every micro-batch.

Follows git-disl/Booster ``trainer.py`` (``VlguardTrainer``: ``get_alignment_dataloader`` with
batch size 4 and a ``RandomSampler``, ``sample_from_alignment`` re-creating the iterator when it
runs out, ``training_step`` with ``compute_loss(inputs) + lamb · compute_loss(alignment)`` in one
backward) and ``script/finetune/united/vlguard_lamb.sh``: λ = 0.1 (``lamb=${1:-0.1}``; the
argparse default of ``train.py`` is 0.001), 2000 alignment rows (``good_sample_num``).

Departures from the reference, and why:

- The alignment data are the run's ``alignment.data`` (the refusals the provider aligned on),
  not the first BeaverTails ``is_safe`` rows; BatchStream reshuffles on every pass, as the
  reference's ``RandomSampler`` does.
- The paper (and git-disl/Lisa's older ``vlguard`` option) mixes the safety rows into the
  fine-tuning data set itself; the Booster port, which this follows, keeps them as a separate
  λ-weighted loss on a batch of 4 every step.
- The combined loss goes through ``trainer.backward`` (divided by grad_accum like every loss in
  hftlab); the reference's ``training_step`` does not divide (its scripts use accumulation 1).
  Gradients of earlier micro-batches are kept.

Returned per micro-batch: ``loss`` is the user batch's cross-entropy (comparable with plain
SFT), ``alignment_loss`` the alignment batch's. Cost: one extra forward-backward on 4 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import BatchStream, alignment_stream, first_last_means

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer


@DEFENSES.register("vlguard_mix")
class VlguardMix(Defense):
    summary = "fine-tuning stage: add λ × the loss on a batch of alignment data every step"
    paper = (
        "Zong et al. 2024, Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large "
        "Language Models, arXiv 2402.02207"
    )
    reference = (
        "git-disl/Booster trainer.py (VlguardTrainer), script/finetune/united/vlguard_lamb.sh"
    )
    stages = (FINETUNE,)
    multi_process = "it has not been tested data-parallel"
    resume_attributes = ("alignment", "trace")
    needs_alignment_data = True

    reference_settings = (
        ReferenceSetting("defense_args.lamb", 0.1,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh"),
        ReferenceSetting("defense_args.alignment_batch_size", 4,
                         "git-disl/Booster trainer.py (VlguardTrainer)"),
        ReferenceSetting("alignment.data", "2000 refusals (good_sample_num)",
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh, utils.py",
                         "hftlab: the run's alignment data; CPU time"),
        ReferenceSetting("finetune.n", 5000,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh", "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.2,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh",
                         "hftlab: p = 0.1 throughout"),
        ReferenceSetting("finetune.train.lr", 0.0001,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh", "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.0,
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh",
                         "effective value: HF's constant schedule ignores the script's "
                         "--warmup_ratio 0.1"),
        ReferenceSetting("finetune.train.schedule", "constant",
                         "git-disl/Booster script/finetune/united/vlguard_lamb.sh"),
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
        lamb: float = 0.1  # λ, weight of the alignment loss (reference vlguard_lamb.sh: 0.1)
        alignment_batch_size: int = 4  # reference get_alignment_dataloader batch size

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.lamb < 0:
            raise ConfigError("defense_args.lamb of 'vlguard_mix' must be >= 0")
        if self.options.alignment_batch_size < 1:
            raise ConfigError("defense_args.alignment_batch_size of 'vlguard_mix' must be >= 1")
        self.alignment: BatchStream | None = None
        self.trace: list[dict[str, float]] = []  # alignment loss per micro-batch

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage == FINETUNE:
            self.alignment = alignment_stream(
                trainer, self.options.alignment_batch_size, self.name
            )
            self.trace = []

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        assert self.alignment is not None
        user_loss = trainer.compute_loss(batch)
        alignment_loss = trainer.compute_loss(self.alignment.next())
        trainer.backward(user_loss + self.options.lamb * alignment_loss)
        value = float(alignment_loss.detach())
        self.trace.append({"alignment_loss": value})
        return {"loss": float(user_loss.detach()), "alignment_loss": value}

    def report(self, stage: str) -> dict[str, object]:
        """The alignment loss averaged over the first and last tenth of the stage."""
        if stage != FINETUNE or not self.trace:
            return {}
        return {"lamb": self.options.lamb, **first_last_means(self.trace)}
