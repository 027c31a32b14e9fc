"""RESTA: restore safety by adding a safety vector to the fine-tuned weights (Bhardwaj et al.
2024, Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned Language Models
through Task Arithmetic, arXiv 2402.11746).

Fine-tuning moves the aligned model W_aligned to W_ft = W_aligned + δ and loses safety. RESTA
adds the direction that alignment added back on top, per linear module:

    W_resta = W_ft + γ · V,    V = W_aligned − W_unaligned,

optionally after DARE (Drop And REscale, Yu et al. 2023, arXiv 2311.03099) has sparsified the
fine-tuning delta δ: each entry is dropped with probability p and the survivors are rescaled by
1 / (1 − p), so the expected delta is unchanged:

    W_resta = W_aligned + DARE_p(δ) + γ · V.

Follows declare-lab/resta: the README ("Safety vector v is the delta parameters ... v = M − Mu;
using mergekit one can add the safety vector to the compromised model Mf, i.e. perform the
operation Mf + b*v"; "For adding safety vectors and DARE, we use mergekit") and
``merge/add_safety.py`` (a mergekit ``linear`` merge of model1 = the compromised model, model2
= the aligned model, model3 = the unaligned model with weights 1, b, −b; the weights sum to 1,
so mergekit's normalisation is the identity and the merge is exactly Mf + b·(M − Mu)). The
repository itself is not in the stored source index; the script's interface was read from a
third-party caller of ``resta-main/merge/add_safety.py`` (weights 1.0, 1.0, −1.0, i.e. b = 1)
and the README from its public page. Defaults: γ = 1 (the README's plain addition "Mf + b*v"
and that invocation); DARE off (``dare_rate`` 0: RESTA without DARE is the method's core; the
drop rate the paper used for its DARE variant could not be confirmed from the stored sources,
so none is claimed as a default).

Departures from the reference, and why:

- The safety vector is V = W_aligned − W_base (``weights.alignment_vectors``): this toolkit's
  provider aligns a base model rather than unaligning an aligned one, so the base model plays
  the unaligned model Mu. Under LoRA alignment V = scale·B·A exactly; under full alignment the
  difference of every 2-D weight except embeddings and the output head (as the reference's
  mergekit merge of linear weights; mergekit would also merge norms and embeddings, which
  alignment vectors here do not cover).
- DARE acts on the fine-tuning delta δ by default (``dare_on: finetune``), as the paper applies
  it to the delta parameters of the fine-tuned model before adding the safety vector;
  ``dare_on: safety_vector`` sparsifies γ·V instead and ``both`` does both (mergekit's
  ``dare_linear`` relative to the aligned model would drop in both task vectors). Masks are
  drawn on the CPU from one generator seeded with the run's seed, module by module in sorted
  name order (fine-tuning delta first, then V), so a run is reproducible on any device.
- Under LoRA fine-tuning the result is returned as a plain merged model, not an adapter: γ·V
  (and a DARE'd δ) is dense, so it has no exact low-rank form in general. Each changed weight
  is computed in fp32 as W_aligned + δ + γ·V (δ = scale·B·A of the user's adapter) and rounded
  once into the weight's dtype, instead of ``merge_and_unload`` followed by adding γ·V (two
  roundings in bf16 storage; identical in fp32). Modules with an adapter but no V get δ merged
  alone; modules with V but no adapter get γ·V alone.
- Under full fine-tuning with DARE on δ, δ = W_ft − W_aligned for every 2-D weight except
  embeddings and the output head, with W_aligned the aligned model the run fine-tuned from.

Reported (``report("post_finetune")``): γ, the DARE rate and target, the fraction of entries
DARE kept, the modules changed (count and kinds), ‖γ·V‖ (one L2 norm over all modules, after
DARE when it acts on V) and ‖δ‖ as added. Cost: one pass over the linear weights, no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, POST_FINETUNE, Defense
from hftlab.defenses.weights import alignment_vectors, lora_factors, lora_layers

if TYPE_CHECKING:
    from hftlab.context import RunContext

DARE_TARGETS = ("finetune", "safety_vector", "both")


def dare_keep_mask(shape: torch.Size, rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's Bernoulli mask on the CPU: True (kept) with probability 1 − ``rate``."""
    return torch.rand(shape, generator=generator) >= rate


def dare(delta: torch.Tensor, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(DARE_rate(delta), entries kept): drop each entry with probability ``rate`` and rescale
    the survivors by 1 / (1 − rate); ``rate`` 0 returns ``delta`` untouched."""
    if rate == 0.0:
        return delta, delta.numel()
    keep = dare_keep_mask(delta.shape, rate, generator).to(delta.device)
    return torch.where(keep, delta / (1.0 - rate), torch.zeros_like(delta)), int(keep.sum())


def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{module name: weight} of every 2-D weight except embeddings and the output head (the
    modules ``weights.alignment_vectors`` covers under full alignment)."""
    return {
        name.removesuffix(".weight"): p
        for name, p in model.named_parameters()
        if p.dim() == 2 and name.endswith(".weight") and "embed" not in name
        and "lm_head" not in name
    }


@DEFENSES.register("resta")
class Resta(Defense):
    summary = "post-fine-tuning: add γ·(aligned − base) weights to the fine-tuned model (+DARE)"
    paper = (
        "Bhardwaj et al. 2024, Language Models are Homer Simpson! Safety Re-Alignment of "
        "Fine-tuned Language Models through Task Arithmetic, arXiv 2402.11746"
    )
    reference = "declare-lab/resta README.md, merge/add_safety.py (mergekit linear merge)"
    stages = (POST_FINETUNE,)
    multi_process = True

    @dataclass
    class Options:
        gamma: float = 1.0  # γ, the safety vector's coefficient (README: Mf + b*v)
        dare_rate: float = 0.0  # DARE drop probability p; 0 = no DARE (plain RESTA)
        dare_on: str = "finetune"  # finetune (the paper's δ_SFT) | safety_vector | both

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if not math.isfinite(o.gamma) or o.gamma < 0:
            raise ConfigError(
                "defense_args.gamma of 'resta' must be a finite number >= 0 (a negative "
                "coefficient would subtract the safety vector)"
            )
        if not 0.0 <= o.dare_rate < 1.0:
            raise ConfigError("defense_args.dare_rate of 'resta' must be in [0, 1)")
        if o.dare_on not in DARE_TARGETS:
            raise ConfigError(
                f"defense_args.dare_on of 'resta' must be one of {', '.join(DARE_TARGETS)}; "
                f"got {o.dare_on!r}"
            )
        self._report: dict[str, Any] = {}

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        o = self.options
        vectors = alignment_vectors(ctx, self.name)
        ft_rate = o.dare_rate if o.dare_on in ("finetune", "both") else 0.0
        sv_rate = o.dare_rate if o.dare_on in ("safety_vector", "both") else 0.0
        layers = lora_layers(model)
        # δ per module is materialised one module at a time (dense fp32 deltas of every linear
        # layer at once would double the model's memory): LoRA keeps the small factors, full
        # fine-tuning the aligned weights to subtract.
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        aligned: dict[str, torch.nn.Parameter] = {}  # W_aligned to rebuild from (full + DARE)
        if layers:
            # The base layers hold W_aligned; δ = scale·B·A is added below together with γ·V.
            factors = {name: lora_factors(layer) for name, layer in layers.items()}
            plain = model.unload()
        elif ft_rate:
            from hftlab.stage_models import aligned_model

            aligned = linear_weights(aligned_model(ctx))
            plain = model
        else:
            plain = model  # full fine-tuning: δ is already in the weights
        tuned = linear_weights(plain) if aligned else {}
        ft_names = set(factors) | set(tuned)
        generator = torch.Generator().manual_seed(ctx.config.seed)
        kept = total = 0
        sv_sq = ft_sq = 0.0
        names = sorted(ft_names | set(vectors))
        with torch.no_grad():
            for name in names:
                weight = self._weight(plain, name)
                new = (aligned[name] if name in aligned else weight).detach().float()
                if name in ft_names:
                    if name in factors:
                        a, b, scale = factors[name]
                        delta = scale * (b @ a)
                    else:
                        delta = tuned[name].detach().float() - new
                    delta, n_kept = dare(delta, ft_rate, generator)
                    if ft_rate:
                        kept, total = kept + n_kept, total + delta.numel()
                    new = new + delta.to(new.device)
                    ft_sq += float(delta.pow(2).sum())
                if name in vectors:
                    vector, n_kept = dare(o.gamma * vectors[name], sv_rate, generator)
                    if sv_rate:
                        kept, total = kept + n_kept, total + vector.numel()
                    new = new + vector.to(new.device)
                    sv_sq += float(vector.pow(2).sum())
                if new.shape != weight.shape:
                    raise ConfigError(
                        f"resta: {name} has shape {tuple(weight.shape)} in the fine-tuned model "
                        f"but its update has {tuple(new.shape)}"
                    )
                weight.copy_(new)
        self._report = {
            "gamma": o.gamma,
            "dare_rate": o.dare_rate,
            "dare_on": o.dare_on if o.dare_rate else None,
            "dare_kept_fraction": round(kept / total, 6) if total else None,
            "finetuning": "lora" if layers else "full",
            "modules_changed": len(names),
            "module_kinds": sorted({name.rsplit(".", 1)[-1] for name in names}),
            "safety_vector_modules": len(vectors),
            "gamma_v_norm": round(math.sqrt(sv_sq), 6),
            "finetune_delta_norm": round(math.sqrt(ft_sq), 6) if ft_names else None,
            "returned": "merged model",
        }
        return plain

    @staticmethod
    def _weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
        try:
            return model.get_submodule(name).weight
        except AttributeError as exc:
            raise ConfigError(
                f"resta: the aligned model's module {name} is not in the fine-tuned model; "
                "were they made from different base models?"
            ) from exc

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == POST_FINETUNE else {}
