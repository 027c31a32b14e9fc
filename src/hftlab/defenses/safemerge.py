"""SafeMERGE: merge the safety LoRA into the fine-tuning LoRA in the layers that drifted from
the alignment subspace (Djuhera et al. 2025, arXiv 2503.17239).

Every LoRA layer gets Safe LoRA's test (``safelora.projection_matrix`` and
``safelora.projected_cosine``): C = V·Vᵀ / ‖V‖_F with V the alignment vector, and
cos(vec(C·B·A), vec(B·A)) over the fine-tuning delta, rounded to 5 decimals. Layers with
cos < ``threshold`` are flagged, and only there the fine-tuning adapter (A_f, B_f, scale s_f) is
merged with the safety adapter (A_s, B_s, s_s) with weights (w_f, w_s) = (0.8, 0.2), the way
PEFT's ``add_weighted_adapter`` (which the reference calls per layer) combines LoRAs: factor by
factor, with the square roots of the scaled weights on each side,

    A = M([A_f, A_s], [±√|w_f s_f|, ±√|w_s s_s|]),   B = M([B_f, B_s], [√|w_f s_f|, √|w_s s_s|]),

and the merged update ΔW = B·A (scale 1). M is ``method``:

- ``linear``: the weighted sum (PEFT ``task_arithmetic``);
- ``ties``: each factor keeps its ``density`` fraction of largest-magnitude entries, a majority
  sign is elected per entry (``majority_sign_method`` "total": sign of the sum of the kept
  entries, "frequency": of their signs), and the weighted kept entries that agree with it are
  averaged (PEFT ``ties``, ``disjoint_merge``);
- ``dare_linear``: each factor keeps each entry with probability ``density`` and is rescaled by
  1/density, then the weighted sum (PEFT ``dare_linear``); the masks come from a generator
  seeded with the run's seed, drawn layer by layer in module order (A_f, A_s, B_f, B_s).

Because the merge acts on the factors, the result is again a LoRA of the same rank: it is
written into the fine-tuning adapter in place (A ← A, B ← B / s_f, so s_f·B·A is the merged ΔW),
and the pipeline saves that adapter as usual; no SVD or full-weight model is needed.

The safety adapter is the alignment stage's LoRA (``weights.alignment_checkpoint``), and V is
its delta s_s·B_s·A_s, the value ``weights.alignment_vectors`` returns for a LoRA alignment
(computed here layer by layer instead of all at once). A full-weight alignment has no safety
LoRA to merge: ConfigError. The two adapters must have the same rank in every flagged module
(PEFT's add_weighted_adapter refuses linear/ties/dare_linear merges otherwise): ConfigError,
before anything is edited.

Follows aladinD/SafeMERGE ``utils.py`` (``compute_safelora_projection_matrices``: V·Vᵀ/‖V‖_F,
zero for ‖V‖_F < 1e-9; ``compute_safelora_cos``; ``SafeLoRAMerger.add_weighted_adapter_safelora``:
``cos < threshold`` ⇒ weights [0.8, 0.2]) and ``get_safemerge_model.py`` defaults:
``--cos_threshold 0.35``, ``--weighting [0.8, 0.2]``, ``--merge_type linear``; density 0.5 is
the README's usage example (the CLI default is None, which PEFT rejects for ties/dare);
``majority_sign_method`` "total" is PEFT's default.

Departures from the reference, and why:

- Layers that are not flagged keep the fine-tuning adapter bitwise. The reference sends them
  through the same merge with weights [1.0, 0.0], which is the identity for ``linear`` but
  still drops (and rescales) random entries of the fine-tuning factors for ``dare_linear``;
  the paper describes merging only the flagged layers.
- ``ties`` is implemented with PEFT's semantics; the reference's merger only handles
  ``linear`` and ``dare_linear`` (for any other type it leaves the merged adapter at zero).
- In the reference the safety adapter is a separate LoRA trained on top of the aligned model
  and V comes from a separate base/aligned pair (e.g. Llama-2-7b-hf vs -chat); here both come
  from the alignment stage, whose LoRA is already merged into the aligned model, so a flagged
  layer re-adds a 0.2-weighted share of the alignment adapter on top of the aligned weights.
- DARE's masks use a seeded generator (the reference draws from torch's global RNG).
- A LoRA layer whose module has no safety adapter is left as is and listed in the report (the
  reference would zero that layer of the merged adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, POST_FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.safelora import projected_cosine, projection_matrix
from hftlab.defenses.weights import (
    ADAPTER,
    Factors,
    adapter_factors,
    alignment_checkpoint,
    lora_factors,
    require_lora,
)

if TYPE_CHECKING:
    from hftlab.context import RunContext

METHODS = ("linear", "ties", "dare_linear")
SIGN_METHODS = ("total", "frequency")
def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` largest-magnitude entries (PEFT
    ``magnitude_based_pruning``; density ≥ 1 keeps everything)."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide by it
    (PEFT ``random_pruning`` with rescale; density ≥ 1 keeps everything)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def combine(tensors: list[torch.Tensor], weights: list[float], method: str, density: float,
            majority_sign_method: str = "total",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's ``task_arithmetic`` / ``ties`` / ``dare_linear`` of same-shape tensors."""
    w = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    w = w.view(-1, *([1] * tensors[0].dim()))
    if method == "linear":
        return (torch.stack(tensors) * w).sum(0)
    if method == "dare_linear":
        return (torch.stack([random_prune(t, density, generator) for t in tensors]) * w).sum(0)
    if method != "ties":
        raise ConfigError(f"safemerge: unknown merge method {method!r}")
    kept = torch.stack([magnitude_prune(t, density) for t in tensors])
    # the majority sign is elected on the pruned, unweighted factors, as PEFT does
    votes = kept.sum(0) if majority_sign_method == "total" else kept.sign().sum(0)
    agree = kept.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (kept * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_lora(task: Factors, safety: Factors, weights: tuple[float, float], method: str,
               density: float, majority_sign_method: str = "total",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged LoRA (scale 1), PEFT ``_generalized_task_arithmetic_weighted_adapter``
    semantics: √|w·s| on each factor, the sign of w·s on A."""
    scaled = [w * f[2] for w, f in zip(weights, (task, safety))]
    wa = [math.copysign(math.sqrt(abs(x)), x) for x in scaled]
    wb = [math.sqrt(abs(x)) for x in scaled]
    a = combine([task[0], safety[0]], wa, method, density, majority_sign_method, generator)
    b = combine([task[1], safety[1]], wb, method, density, majority_sign_method, generator)
    return a, b


@DEFENSES.register("safemerge")
class SafeMERGE(Defense):
    summary = "post-fine-tuning: merge the safety LoRA into layers that left the safety subspace"
    paper = (
        "Djuhera et al. 2025, SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large "
        "Language Models via Selective Layer-Wise Model Merging, arXiv 2503.17239"
    )
    reference = "aladinD/SafeMERGE utils.py (SafeLoRAMerger), get_safemerge_model.py"
    stages = (POST_FINETUNE,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.threshold", 0.35,
                         "aladinD/SafeMERGE get_safemerge_model.py (--cos_threshold)"),
        ReferenceSetting("defense_args.task_weight", 0.8,
                         "aladinD/SafeMERGE get_safemerge_model.py (--weighting)"),
        ReferenceSetting("defense_args.safety_weight", 0.2,
                         "aladinD/SafeMERGE get_safemerge_model.py (--weighting)"),
        ReferenceSetting("defense_args.method", "linear",
                         "aladinD/SafeMERGE get_safemerge_model.py (--merge_type)"),
        ReferenceSetting("defense_args.density", 0.5,
                         "aladinD/SafeMERGE README.md (--density 0.5)"),
        ReferenceSetting("defense_args.majority_sign_method", "total",
                         "huggingface/peft LoraModel.add_weighted_adapter (default)"),
    )

    @dataclass
    class Options:
        threshold: float = 0.35  # merge where cos < threshold (--cos_threshold 0.35)
        task_weight: float = 0.8  # weight of the fine-tuning LoRA (--weighting [0.8, 0.2])
        safety_weight: float = 0.2  # weight of the safety LoRA (--weighting [0.8, 0.2])
        method: str = "linear"  # linear | ties | dare_linear (--merge_type linear)
        density: float = 0.5  # kept fraction for ties / dare_linear (README: --density 0.5)
        majority_sign_method: str = "total"  # ties sign election (PEFT default "total")

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        opts = self.options
        if opts.method not in METHODS:
            raise ConfigError(
                f"defense_args.method of 'safemerge' must be one of {', '.join(METHODS)}, "
                f"got {opts.method!r}"
            )
        if opts.majority_sign_method not in SIGN_METHODS:
            raise ConfigError(
                "defense_args.majority_sign_method of 'safemerge' must be one of "
                f"{', '.join(SIGN_METHODS)}, got {opts.majority_sign_method!r}"
            )
        if not 0.0 < opts.density <= 1.0:
            raise ConfigError("defense_args.density of 'safemerge' must be in (0, 1]")
        if not -1.0 <= opts.threshold <= 1.0:
            raise ConfigError("defense_args.threshold of 'safemerge' is a cosine: in [-1, 1]")
        if not all(math.isfinite(w) for w in (opts.task_weight, opts.safety_weight)):
            raise ConfigError("defense_args task_weight / safety_weight of 'safemerge' must be "
                              "finite numbers")
        self._report: dict[str, Any] = {}

    def safety_adapter(self, ctx: RunContext, device: torch.device) -> dict[str, Factors]:
        folder = alignment_checkpoint(ctx, self.name)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(
                "defense 'safemerge' merges the alignment stage's safety LoRA into the "
                "fine-tuning LoRA, but the alignment saved full weights; set "
                "alignment.train.method: lora"
            )
        return adapter_factors(folder, device)

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        layers = require_lora(model, self.name)
        opts = self.options
        device = next(iter(layers.values())).lora_B[ADAPTER].weight.device
        safety = self.safety_adapter(ctx, device)
        cosines: dict[str, float] = {}
        missing: list[str] = []
        with torch.no_grad():
            for name, layer in layers.items():
                if name not in safety:
                    missing.append(name)
                    continue
                a, b, _ = lora_factors(layer)
                a_s, b_s, s_s = safety[name]
                if b_s.shape[0] != b.shape[0] or a_s.shape[1] != a.shape[1]:
                    raise ConfigError(
                        f"safemerge: the safety LoRA of {name} is {b_s.shape[0]}×{a_s.shape[1]}, "
                        f"the fine-tuning LoRA {b.shape[0]}×{a.shape[1]}: the aligned and "
                        "fine-tuned models must be the same architecture"
                    )
                cosines[name] = projected_cosine(projection_matrix(s_s * (b_s @ a_s)), a, b)
            flagged = [name for name, cos in cosines.items() if cos < opts.threshold]
            ranks = {name: (safety[name][0].shape[0], layers[name].lora_A[ADAPTER].weight.shape[0])
                     for name in flagged}
            mismatched = [f"{name} (safety r={rs}, fine-tuning r={rf})"
                          for name, (rs, rf) in ranks.items() if rs != rf]
            if mismatched:
                raise ConfigError(
                    "safemerge merges LoRAs factor by factor (PEFT add_weighted_adapter), which "
                    "needs equal ranks; set alignment.train.lora.r equal to "
                    f"finetune.train.lora.r. Mismatched: {', '.join(mismatched[:3])}"
                )
            generator = torch.Generator(device=device).manual_seed(ctx.config.seed)
            for name in flagged:
                layer = layers[name]
                task = lora_factors(layer)
                a, b = merge_lora(task, safety[name], (opts.task_weight, opts.safety_weight),
                                  opts.method, opts.density, opts.majority_sign_method,
                                  generator)
                weight_a, weight_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                weight_a.copy_(a.to(weight_a.dtype))
                weight_b.copy_((b / task[2]).to(weight_b.dtype))  # the layer scales by s_f
        self._report = {
            "method": opts.method,
            "threshold": opts.threshold,
            "weights": [opts.task_weight, opts.safety_weight],
            "density": opts.density if opts.method != "linear" else None,
            "n_layers": len(layers),
            "n_merged": len(flagged),
            "merged": flagged,
            "cosines": cosines,
            "no_safety_adapter": missing,
        }
        return model

    def report(self, stage: str) -> dict[str, Any]:
        return self._report if stage == POST_FINETUNE else {}
