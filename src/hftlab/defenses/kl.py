"""KL regularisation towards the aligned model during fine-tuning: git-disl's "KL" baseline,
shipped with the code of Vaccine (Huang et al. 2024, arXiv 2402.01109); it has no paper of its
own, so the reference code is the specification.

The user's fine-tuning objective gets the divergence of the current model from the aligned one,
on the user's own batch:

    L = CE(w; x) + λ · (1/B) · Σ_{positions t} KL( p_aligned(· | x_<t) ‖ p_w(· | x_<t) )

with p the next-token distribution (softmax over the vocabulary), B the number of sequences in
the micro-batch (``KLDivLoss(reduction="batchmean")``: a sum over positions, a mean over
sequences) and the aligned model the one the stage starts from: the same network with the fresh
LoRA adapter switched off, or (full fine-tuning) a frozen copy made at ``setup``. The aligned
distribution is a constant (no gradient).

Follows git-disl/Vaccine ``trainer.py`` (``KLTrainer``, commit 906f520): the teacher is the
state dict of the model when fine-tuning starts (the merged aligned model plus the zero-initialised
fresh LoRA, i.e. the aligned model), run on the same inputs; ``λ · KLDivLoss(batchmean)(
log_softmax(student), softmax(teacher))`` is added to the cross-entropy; λ = 0.1
(``script/KL_finetune/sst2.sh``, ``lamb=${3:-0.1}``; the gsm8k and alpaca scripts of that folder
are EWC copies). The reference's logits cover every position of the batch, prompt included
(``positions: all``); ``positions: supervised`` keeps only the positions that predict an answer
token.

Departures from the reference, and why:

- The reference takes ``log_softmax``/``softmax`` over ``dim=1`` of the (batch, sequence,
  vocabulary) logits, i.e. it normalises each vocabulary entry's logits across the positions of a
  sequence, which is not a next-token distribution; we take the softmax over the vocabulary, the
  KL between the two models' next-token distributions that the baseline is meant to be. λ keeps
  the reference value, but its effective strength differs from the reference's.
- Padding positions are left out (the reference's ``batchmean`` sums over padded positions too);
  with length-grouped batches the padding is an artefact of batching.
- The reference forwards the student twice (once for the KL, once inside ``compute_loss``); here
  one forward gives both the cross-entropy and the KL logits.

Returned per micro-batch: ``loss`` is the cross-entropy (comparable with the other defenses) and
``kl`` the (unweighted) KL term. Cost: one extra no-grad forward of the aligned model and the LM
head at every position of both models (float32 logits of size positions × vocabulary); the CE
and the KL share one log_softmax and one hand-written gradient (:class:`CrossEntropyAndKL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import first_last_means, frozen_copy_if_full, stage_start_model
from hftlab.model import causal_lm_parts
from hftlab.train import IGNORE_INDEX

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

POSITIONS = ("all", "supervised")


def predicting_supervised(batch: Batch) -> torch.Tensor:
    """(B, T) mask of the positions whose next token is a supervised (answer) token."""
    mask = torch.zeros_like(batch.labels, dtype=torch.bool)
    mask[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    return mask


def kl_positions(batch: Batch, positions: str) -> torch.Tensor:
    """(B, T) mask of the positions whose next-token distributions enter the KL."""
    if positions == "supervised":
        return predicting_supervised(batch)
    return batch.attention_mask.bool()


def logits_at(model: torch.nn.Module, batch: Batch, select: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``model`` at the ``select``ed positions (row-major order), the LM head
    run only there (Gemma-2's final soft-capping applied as in ``supervised_logits``)."""
    body, head = causal_lm_parts(model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    logits = head(hidden[select]).float()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def kl_batchmean(aligned_logits: torch.Tensor, logits: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ_positions KL(softmax(aligned) ‖ softmax(current)) / n_rows, over the vocabulary."""
    log_p = F.log_softmax(aligned_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() / n_rows


class CrossEntropyAndKL(torch.autograd.Function):
    """(CE, KL) of float32 ``logits`` whose rows are all KL positions, sharing one log_softmax
    and writing one gradient: CE the mean −log q(target) over the rows of ``ce_rows`` (their
    ``targets``), KL = Σ_rows Σ_v p (log p − log q) / n_rows with p = softmax(``aligned_logits``)
    constant. Equal to ``cross_entropy(logits[ce_rows], targets)`` and :func:`kl_batchmean` up
    to rounding order; saves the row-subset copies whose backward scatters into zeros, the
    second log_softmax and the autograd intermediates of the vocabulary-sized tensors. All of
    the step's vocabulary-sized work happens in here (benchmarks/defense_overhead.py times it)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, aligned_logits: torch.Tensor, ce_rows: torch.Tensor,
                targets: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        aligned_logp = F.log_softmax(aligned_logits.float(), dim=-1)
        log_q = F.log_softmax(logits, dim=-1)
        p = aligned_logp.exp()
        # one vocabulary-sized temporary, not two: this line took 9 % of a CPU step on the
        # embedded model with two, 6 % with one (py-spy)
        kl = torch.sub(aligned_logp, log_q).mul_(p).sum() / n_rows
        rows = ce_rows.nonzero().squeeze(1)
        ce = -log_q[rows, targets].mean()
        ctx.save_for_backward(log_q, p, rows, targets)
        ctx.n_rows = n_rows
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor):
        log_q, p, rows, targets = ctx.saved_tensors
        # d/dz of Σ_v g_v log_softmax(z)_v is g − softmax(z)·Σ_v g_v, per row
        kl_scale = grad_kl / ctx.n_rows
        ce_scale = grad_ce / rows.numel()
        row_sum = p.sum(-1, keepdim=True) * kl_scale
        row_sum[rows] += ce_scale
        grad = log_q.exp().mul_(row_sum).addcmul_(p, kl_scale, value=-1)
        grad[rows, targets] -= ce_scale
        return grad, None, None, None, None


@DEFENSES.register("kl")
class KL(Defense):
    summary = "fine-tuning stage: λ·KL(aligned ‖ current) next-token distributions on the batch"
    paper = (
        "no dedicated paper: the KL-to-aligned-model baseline in the code of Huang et al. 2024, "
        "Vaccine: Perturbation-aware Alignment, arXiv 2402.01109 (git-disl/Vaccine)"
    )
    reference = "git-disl/Vaccine trainer.py (KLTrainer), script/KL_finetune/sst2.sh"
    stages = (FINETUNE,)
    multi_process = "its KL term is a per-row mean that token-weighted shards do not reproduce"
    reads_stage_start_model = True
    resume_attributes = ("trace",)

    reference_settings = (
        ReferenceSetting("defense_args.lamb", 0.1, "git-disl/Vaccine script/KL_finetune/sst2.sh"),
        ReferenceSetting("defense_args.positions", "all",
                         "git-disl/Vaccine trainer.py (KLTrainer: logits at every position)"),
        ReferenceSetting("finetune.train.lr", 1e-5, "git-disl/Vaccine script/KL_finetune/sst2.sh",
                         "calibrated: 1e-5 does not move the 135M model in 100 steps"),
        ReferenceSetting("finetune.train.epochs", 20, "git-disl/Vaccine script/KL_finetune/sst2.sh",
                         "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Vaccine script/KL_finetune/sst2.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Vaccine script/KL_finetune/sst2.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.1,
                         "git-disl/Vaccine script/KL_finetune/sst2.sh", "hftlab: no warm-up"),
        ReferenceSetting("finetune.train.schedule", "cosine",
                         "git-disl/Vaccine script/KL_finetune/sst2.sh",
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
        lamb: float = 0.1  # λ (script/KL_finetune/sst2.sh: lamb 0.1)
        positions: str = "all"  # all (reference: every position) | supervised (answer only)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.positions not in POSITIONS:
            raise ConfigError(
                f"defense_args.positions '{self.options.positions}' of 'kl' must be one of "
                f"{', '.join(POSITIONS)}"
            )
        if self.options.lamb < 0:
            raise ConfigError("defense_args.lamb of 'kl' must be >= 0")
        self.frozen: torch.nn.Module | None = None
        self.trace: list[dict[str, float]] = []  # unweighted KL per micro-batch

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage == FINETUNE:
            self.frozen = frozen_copy_if_full(trainer)
            self.trace = []

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        select = kl_positions(batch, self.options.positions)
        supervised = predicting_supervised(batch)
        both = select | supervised  # equals select: answer positions are real tokens
        with stage_start_model(trainer, self.frozen) as aligned, trainer.autocast():
            aligned_logits = logits_at(aligned, batch, select)
        with trainer.autocast():
            logits = logits_at(trainer.model, batch, both)
        targets = torch.full_like(batch.labels, IGNORE_INDEX)
        targets[:, :-1] = batch.labels[:, 1:]
        n_rows = batch.labels.shape[0]
        if torch.equal(both, select):  # always, unless an answer token is masked out
            ce, kl = CrossEntropyAndKL.apply(logits, aligned_logits, supervised[select],
                                             targets[supervised], n_rows)
        else:  # Boolean indexing is row-major: a mask of ``both`` picks each subset in order
            ce = F.cross_entropy(logits[supervised[both]], targets[supervised])
            kl = kl_batchmean(aligned_logits, logits[select[both]], n_rows)
        trainer.backward(ce + self.options.lamb * kl)
        value = float(kl.detach())
        self.trace.append({"kl": value})
        return {"loss": float(ce.detach()), "kl": value}

    def report(self, stage: str) -> dict[str, object]:
        """The unweighted KL term averaged over the first and last tenth of the stage: how far
        the fine-tuned model's next-token distributions moved from the aligned model's."""
        if stage != FINETUNE or not self.trace:
            return {}
        return first_last_means(self.trace)
