"""RepNoise: remove harmful information from the representations in the alignment stage
(Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful Finetuning,
arXiv 2405.14577).

A model that is already aligned still *encodes* how to answer harmful questions; harmful
fine-tuning only has to bring it back. RepNoise trains the alignment stage with

    L = CE(harmless) + β · mean_l MMD(a_l(harmful), N(0, I)) − α · log(1 + mean_s CE_s(harmful))

* ``CE(harmless)``: next-token cross-entropy on the alignment (refusal) batch;
* ``a_l``: the output of decoder layer l's MLP on the provider's harmful QA batch, at the masked
  positions (zeros elsewhere), flattened per example; ``MMD`` with a mixture of five Gaussian
  kernels against Gaussian noise masked the same way, averaged over the layers — pushes the
  harmful representations towards noise;
* ``CE_s``: the logit-lens cross-entropy of the harmful tokens read from hidden state s
  (the embedding output and the output of every layer, through the final norm and the LM head),
  averaged over the L + 1 states — gradient *ascent* on the harmful answer at every depth,
  damped by the log.

Only tokens where the harmful and the harmless inputs differ count in the two harmful terms
(the paper pairs each harmful answer with a refusal to the same question: the shared prompt
drops out). Our harmful and alignment batches are drawn independently, as in the git-disl port,
so the mask keeps nearly every real harmful token, prompt included; what drops out is what
coincides at the same position, mostly the chat template's opening tokens.

Follows ``representation_noising/loss.py`` (domenicrosati/representation-noising, ``rep_noise_loss``
with ``MMD_loss`` and ``masked_token_ce_loss``) and its port ``loss_func/repnoise_loss.py`` in
git-disl/Booster (``adapt_dimension_b2a``: the harmless ids are padded / truncated to the
harmful batch's shape, since the git-disl harmful and alignment batches are not paired — nor are
ours).

α follows the reference that matches the run: git-disl's LoRA port
(``script/alignment/repNoise.sh``: ``alpha=0.1`` passed as ``--rho``, ``beta=0.001`` as
``--lamb``, on its r 32, α 4 q/k/v adapter) when the alignment stage trains a LoRA, RepNoise's own
full-parameter code (``notebooks/repnoise_demo.ipynb``: ``rep_noise_loss(..., beta=0.001,
alpha=1)``, the ``loss.py`` defaults) under full fine-tuning. ``alpha: null`` (default) resolves
to 0.1 or 1 at setup from the stage's ``method`` and the stage report records it
(``alpha_used``); a number given is used as it is. β = 0.001 in both. git-disl's
``RepNoiseTrainer`` draws a fresh harmful batch of the training batch size every step (our
default ``harmful_batch_size``).

Kept from the reference: MMD kernels ``kernel_mul`` 2, ``kernel_num`` 5, bandwidth = mean squared
L2 distance over the 2B(2B − 1) off-diagonal pairs of [activations; noise] (not differentiated,
as the reference's ``L2_distance.data``), divided by 2^(5 // 2), then × 2^i; MMD =
mean(K_xx + K_yy − K_xy − K_yx); the noise is drawn per layer with the activations' shape and
masked; the harmful term is ``log(sum / n + 1)`` — the reference's bracketing
``torch.log(harmful_losses / len(hidden_states) + 1)``, i.e. one plus the *mean*, not the sum
over n + 1.

Departures, and why:

* Mask: the reference compares raw (0-padded) ids, so padding of the shorter harmless batch
  counts as "different" and the harmful batch's padding counts wherever the harmless batch has a
  real token. Here a harmful position counts when it is a real token (attention mask 1) and the
  harmless batch has no real token there (shorter, fewer rows, or padding) or a different one.
  The reference's extra quirk of ignoring every target whose id is 0 (its pad id) is dropped.
* Masked CE: the reference multiplies the *logits* at unmasked positions by zero, so the first
  differing token of each run is scored from uniform logits (a constant log V in the mean with no
  gradient). Here every masked target is scored from its real logits.
* Logit lens: ``output_hidden_states`` returns the last state *after* the final norm, and the
  reference applies the norm again to it and also adds the final-logit CE once more to the sum
  (n + 1 terms divided by n). Here the states are the input of the first decoder layer and each
  layer's raw output, so the lens of the last state is exactly the model's own CE, counted once;
  ``mean_s`` is a plain mean over the L + 1 states.
* Harmless CE: the reference scores the harmless batch only at positions differing from the
  harmful ids. With paired data those are the refusal's tokens (the prompt is shared); with our
  unpaired batches that mask would also train language modelling on the refusal prompts
  (harmful instructions), which alignment deliberately does not do. So the harmless term is the
  stage's supervised loss (``trainer.compute_loss``): CE over the refusal answer tokens, the same
  loss as the SFT baseline's alignment.
* The lens logits (N × vocabulary per state) are never stored for all L + 1 states: with a
  plain bias-free linear LM head, :class:`FusedLensCE` forms each state's gradient
  (softmax − one-hot) @ W in the forward pass, chunk by chunk, and keeps only that (N × H);
  other heads (LoRA on the head, quantised, soft-capped) recompute the logits in the backward
  pass (``torch.utils.checkpoint``). The pairwise distances come from a Gram matrix rather than
  a (2B, 2B, T·H) difference tensor. Same values, far less memory, and the fused path does two
  vocabulary projections per state instead of three.
* The noise comes from a generator seeded from the run's seed (reproducible runs).

Data: the alignment batch (refusals) is the harmless batch; the harmful batch comes from the
provider's harmful QA (``provider_harmful`` in the config, e.g. BeaverTails rows 50-149 in
configs/cpu_sst2.yaml), ``harmful_batch_size`` rows per step (default: the stage's batch size).
Cost: a forward on the harmful and one on the harmless batch, one backward through both, plus
L + 1 LM-head projections of the masked harmful tokens and L + 1 products of their
(vocabulary-sized) gradient with the head's weight; on a 135M model with a 49k vocabulary these
projections cost several times the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from hftlab.config import ConfigError
from hftlab.defenses.base import ALIGNMENT, DEFENSES, Defense, ReferenceSetting
from hftlab.defenses.common import (
    BatchStream,
    decoder_layers,
    first_last_means,
    mlp_modules,
    provider_harmful_stream,
    record_outputs,
)
from hftlab.defenses.repnoise_losses import LENS_CHUNK as LENS_CHUNK
from hftlab.defenses.repnoise_losses import UNDERFLOW_LOG_PROB as UNDERFLOW_LOG_PROB
from hftlab.defenses.repnoise_losses import (
    FusedLensCE,
    ce_rows,
    fusable_head,
    lens_weight,
    mmd_loss,
)
from hftlab.defenses.repnoise_losses import masked_ce as masked_ce
from hftlab.model import causal_lm_parts
from hftlab.train import supervised_loss

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

# α by how the alignment stage trains: git-disl's LoRA port, RepNoise's full-parameter code
ALPHA_LORA, ALPHA_FULL = 0.1, 1.0
PORT_SCRIPT = "git-disl/Booster script/alignment/repNoise.sh"
PORT_TRAIN = "git-disl/Booster train.py"


def difference_mask(harmful: Batch, harmless: Batch) -> torch.Tensor:
    """Bool (B, T) over the harmful batch: a real harmful token that the harmless batch, cut or
    padded to the harmful batch's shape, does not have at the same place (different id, padding,
    or beyond its rows/length)."""
    rows, width = harmful.input_ids.shape
    other = torch.full_like(harmful.input_ids, -1)  # -1: no harmless token here
    r, w = min(rows, harmless.input_ids.shape[0]), min(width, harmless.input_ids.shape[1])
    ids = harmless.input_ids[:r, :w].to(other.device)
    real = harmless.attention_mask[:r, :w].to(other.device).bool()
    other[:r, :w] = torch.where(real, ids, other[:r, :w])
    return harmful.attention_mask.bool() & (harmful.input_ids != other)


def final_norm(body: torch.nn.Module) -> torch.nn.Module:
    """The norm the decoder body applies before the LM head."""
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(body, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigError(f"repnoise: cannot find the final norm of {type(body).__name__}")


@contextmanager
def _record_input(module: torch.nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, keep the hidden states ``module`` was called with on the last forward
    (in the autograd graph): for the first decoder layer, the embeddings."""
    seen: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        seen[0] = args[0] if args else kwargs["hidden_states"]

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def harmful_terms(
    model: torch.nn.Module,
    harmful: Batch,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over layers of MMD(masked MLP outputs, masked noise), mean over the L + 1 hidden
    states of the logit-lens CE of the masked harmful tokens) on one harmful batch. Run it under
    the trainer's autocast; both terms are computed in float32."""
    body, head = causal_lm_parts(model)
    norm = final_norm(body)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    layers = decoder_layers(model)
    with (_record_input(layers[0]) as embedded, record_outputs(layers) as outputs,
          record_outputs(mlp_modules(model)) as mlp_outputs):
        body(input_ids=harmful.input_ids, attention_mask=harmful.attention_mask)
    states = [*embedded, *outputs]  # the L + 1 hidden states
    mask = mask.to(harmful.input_ids.device)

    keep = mask.unsqueeze(-1).to(torch.float32)
    noise_terms = []
    for act in mlp_outputs:
        hidden = act.float() * keep
        noise = torch.randn(
            hidden.shape, generator=generator, device=hidden.device, dtype=torch.float32
        ) * keep
        noise_terms.append(mmd_loss(hidden.flatten(1), noise.flatten(1)))

    keep_target = mask[:, 1:]  # position t predicts token t + 1
    targets = harmful.input_ids[:, 1:][keep_target]

    def lens_ce(rows: torch.Tensor) -> torch.Tensor:
        logits = head(norm(rows))
        if softcap:  # Gemma-2, as in supervised_logits
            logits = torch.tanh(logits.float() / softcap) * softcap
        return ce_rows(logits, targets)

    if targets.numel() and fusable_head(head, softcap):
        weight = lens_weight(head.weight)  # cast once for the L + 1 states
        lens_terms = [FusedLensCE.apply(norm(state[:, :-1][keep_target]), weight, targets,
                                        LENS_CHUNK) for state in states]
    else:
        lens_terms = [checkpoint(lens_ce, state[:, :-1][keep_target], use_reentrant=False)
                      for state in states]
    return torch.stack(noise_terms).mean(), torch.stack(lens_terms).mean()


def combine(
    harmless_ce: torch.Tensor, noise: torch.Tensor, lens: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """CE(harmless) + β · MMD − α · log(1 + logit-lens CE)."""
    return harmless_ce.float() + beta * noise - alpha * torch.log1p(lens)


def repnoise_loss(
    model: torch.nn.Module,
    harmful: Batch,
    harmless: Batch,
    alpha: float = 1.0,
    beta: float = 0.001,
    generator: torch.Generator | None = None,
    autocast: Callable[[], Any] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total RepNoise loss, its parts) for one harmful and one harmless (alignment) batch."""
    mask = difference_mask(harmful, harmless)
    with autocast():
        noise, lens = harmful_terms(model, harmful, mask, generator)
        harmless_ce = supervised_loss(model, harmless)
    total = combine(harmless_ce, noise, lens, alpha, beta)
    return total, {"harmless_loss": harmless_ce, "noise_loss": noise, "harmful_lens_loss": lens}


@DEFENSES.register("repnoise")
class RepNoise(Defense):
    """Representation Noising in the alignment stage: each micro-batch of refusals is paired with
    a batch of the provider's harmful QA and trained on :func:`repnoise_loss` (see the module
    docstring for the objective, the references it follows and where it departs from them).
    Other stages are plain SFT."""

    summary = "alignment stage: push harmful representations to noise, ascend harmful lens CE"
    paper = (
        "Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful "
        "Finetuning, arXiv 2405.14577"
    )
    reference = (
        "domenicrosati/representation-noising representation_noising/loss.py (rep_noise_loss); "
        "git-disl/Booster loss_func/repnoise_loss.py"
    )
    stages = (ALIGNMENT,)
    multi_process = (
        "its noise-matching (MMD) term is a batch statistic not reduced across processes")
    resume_attributes = ("harmful", "noise", "trace")
    needs_provider_harmful = True
    irreducible = ("logit-lens projections of all L + 1 hidden states onto the vocabulary and "
                   "their softmax gradients (FusedLensCE; ≈75% of the step, measured with "
                   "torch.profiler on configs/quickstart.yaml, bf16)",)

    @dataclass
    class Options:
        # α, weight of the harmful logit-lens ascent; None: 0.1 when the alignment stage trains
        # a LoRA (git-disl's port), 1 under full fine-tuning (RepNoise's code)
        alpha: float | None = None
        beta: float = 0.001  # β, weight of the MMD-to-noise term (reference 0.001)
        harmful_batch_size: int | None = None  # None: the stage's batch size (as git-disl)

    reference_settings = (
        ReferenceSetting("defense_args.alpha", ALPHA_LORA, PORT_SCRIPT,
                         "alpha=0.1 (--rho) in the LoRA port; 1 in domenicrosati/representation-"
                         "noising (full parameters): null picks by alignment.train.method"),
        ReferenceSetting("defense_args.beta", 0.001, PORT_SCRIPT,
                         "beta=0.001 (--lamb); the same in RepNoise's code"),
        ReferenceSetting("defense_args.harmful_batch_size", None, "git-disl/Booster trainer.py",
                         "RepNoiseTrainer: a harmful batch of the training batch size"),
        ReferenceSetting("provider_harmful.n", 5000, PORT_TRAIN,
                         "the harmful answers of beavertails_with_refusals_train.json rows "
                         "5001-9999 (utils.py's strict bounds), the alignment refusals' prompts"),
        ReferenceSetting("alignment.data.n", 5000, PORT_SCRIPT,
                         "sample_num 5000: refusals of the same rows 5001-9999"),
        ReferenceSetting("alignment.train.lr", 5e-4, PORT_SCRIPT,
                         "RepNoise's full-parameter demo: 1e-4, 1 epoch, cosine"),
        ReferenceSetting("alignment.train.epochs", 20, PORT_SCRIPT),
        ReferenceSetting("alignment.train.batch_size", 5, PORT_SCRIPT,
                         "lowered from 10 for memory (script comment)"),
        ReferenceSetting("alignment.train.weight_decay", 0.1, PORT_SCRIPT),
        ReferenceSetting("alignment.train.warmup_ratio", 0.0, PORT_SCRIPT),
        ReferenceSetting("alignment.train.schedule", "constant", PORT_SCRIPT),
        ReferenceSetting("alignment.train.max_length", 256, PORT_TRAIN, "model_max_length"),
        ReferenceSetting("alignment.train.lora.r", 32, PORT_TRAIN, "LORA_PRESETS 'reference'"),
        ReferenceSetting("alignment.train.lora.alpha", 4, PORT_TRAIN),
        ReferenceSetting("alignment.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         PORT_TRAIN),
    )

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        size = self.options.harmful_batch_size
        if size is not None and size < 1:
            raise ConfigError("defense_args.harmful_batch_size of 'repnoise' must be >= 1")
        self.harmful: BatchStream | None = None
        self.noise: torch.Generator | None = None
        self.alpha_used: float | None = None  # α after setup (the option, or by method)
        self.trace: list[dict[str, float]] = []  # the three terms per step

    def resolved_alpha(self, method: str) -> float:
        """α for an alignment stage trained with ``method`` (``lora`` or ``full``)."""
        if self.options.alpha is not None:
            return self.options.alpha
        return ALPHA_FULL if method == "full" else ALPHA_LORA

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != ALIGNMENT:
            return
        self.alpha_used = self.resolved_alpha(trainer.cfg.method)
        size = self.options.harmful_batch_size or trainer.cfg.batch_size
        self.harmful = provider_harmful_stream(trainer, size, self.name)
        self.noise = torch.Generator(device=trainer.device)
        self.noise.manual_seed(trainer.seed + 2)
        self.trace = []

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != ALIGNMENT:
            return super().training_step(stage, trainer, batch)
        assert self.harmful is not None and self.alpha_used is not None, "setup() was not called"
        loss, parts = repnoise_loss(
            trainer.model, self.harmful.next(), batch, self.alpha_used, self.options.beta,
            generator=self.noise, autocast=trainer.autocast,
        )
        trainer.backward(loss)
        stats = {k: float(v.detach()) for k, v in parts.items()}
        self.trace.append(stats)
        return {"loss": float(loss.detach()), **stats}

    def report(self, stage: str) -> dict[str, object]:
        """The α used and the three terms averaged over the first and last tenth of the
        alignment stage: the MMD should fall and the harmful logit-lens CE rise."""
        if stage != ALIGNMENT or self.alpha_used is None:
            return {}
        return {"alpha_used": self.alpha_used, **first_last_means(self.trace)}
