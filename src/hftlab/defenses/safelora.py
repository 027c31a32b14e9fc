"""Safe LoRA: project the fine-tuning LoRA onto the alignment subspace, layer by layer (Hsu et
al. 2024, arXiv 2405.16833).

For every LoRA layer with fine-tuning update ΔW = s·B·A and alignment vector
V = W_aligned − W_base (the same module's weight before and after the provider's alignment):

    C   = V·Vᵀ / ‖V‖_F                       (the "projection", [out × out], fp32)
    cos = cos( vec(C·B·A), vec(B·A) )          (over the full delta, rounded to 5 decimals)
    B  ← C·B                                   in the layers selected below; A is left as is.

Layers are selected by ``select: number`` (the ``num_proj_layers`` lowest cosines: every layer
with cos ≤ the k-th smallest cosine, so ties can select more than k) or ``select: threshold``
(cos ≤ ``threshold``). A low cosine means the fine-tuning update points away from the
alignment subspace, where it erodes safety most.

Follows IBM/SafeLoRA ``model.py`` (``SafeLoRA.get_aligned_matrix``: C = V·Vᵀ / torch.norm(V),
the Frobenius norm, with no re-normalisation of C, computed in the dtype the reference loads
the models in, fp32; ``SafeLoRA.projected_weighted``: the cosine of P·B·A against B·A without
the LoRA scale, which cancels, ``numpy.round(cos, 5)``, ``cos <= threshold``, B ← P·B from the
original B) and the defaults of its ``config.py`` (``SafeLoRAConfig``): ``select_layers_type``
"number", ``threshold`` 0.5, ``num_proj_layers`` 10.

Departures from the reference, and why:

- V comes from the alignment stage's checkpoint (``weights.alignment_vectors``: exact
  s·B·A of the alignment adapter under LoRA alignment, else the aligned minus the base
  weights), and layers are matched to their V by module name rather than by the position of
  the weight in ``named_parameters`` (the same pairing when every module is present, and no
  silent mismatch when one is not).
- A LoRA layer without an alignment vector (a module the alignment never changed) is left as
  is and listed in the report: the reference would divide by ‖V‖ = 0 and write NaN into B.
  (``projection_matrix`` returns C = 0 for V = 0, the guard of aladinD/SafeMERGE.)
- C·B is computed and written in fp32 (the fine-tuning adapter's dtype) and copied into B with
  its dtype kept; the reference multiplies in the PEFT model's dtype.
- The report records every layer's cosine, the projected layers, the cosine cut actually used
  and the reference's "Pdst" diagnostic (mean over layers of 1 / (1 + ‖B_new − C·B‖)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, POST_FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.weights import (
    ADAPTER,
    alignment_vectors,
    lora_factors,
    require_lora,
)

if TYPE_CHECKING:
    from hftlab.context import RunContext

SELECT = ("number", "threshold")
ZERO_NORM = 1e-9  # below this ‖V‖_F the alignment left the module unchanged (SafeMERGE's guard)


def projection_matrix(v: torch.Tensor) -> torch.Tensor:
    """C = V·Vᵀ / ‖V‖_F in fp32 ([out × out]); zeros when V is (numerically) zero."""
    v = v.float()
    norm = torch.linalg.matrix_norm(v)  # Frobenius, = torch.norm(V) of the reference
    if norm < ZERO_NORM:
        return torch.zeros(v.shape[0], v.shape[0], dtype=v.dtype, device=v.device)
    return (v @ v.T) / norm


def projected_cosine(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(vec(C·B·A), vec(B·A)) rounded to 5 decimals, as both references report it. The LoRA
    scale multiplies both sides and cancels."""
    delta = b @ a
    projected = (c @ b) @ a
    cos = torch.nn.functional.cosine_similarity(projected.reshape(1, -1), delta.reshape(1, -1))
    return round(float(cos.item()), 5)


def select_layers(cosines: dict[str, float], select: str, threshold: float,
                  num_layers: int) -> tuple[list[str], float | None]:
    """(modules to repair, the cosine cut used): cos ≤ threshold, or cos ≤ the k-th smallest
    cosine for ``select: number`` (IBM model.py ``numpy.sort(cos)[:k][-1]``)."""
    if not cosines:
        return [], None
    cut = threshold if select == "threshold" else sorted(cosines.values())[:num_layers][-1]
    return [name for name, cos in cosines.items() if cos <= cut], cut


@DEFENSES.register("safelora")
class SafeLoRA(Defense):
    summary = "post-fine-tuning: project the LoRA of low-cosine layers onto the alignment subspace"
    paper = (
        "Hsu et al. 2024, Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning "
        "Large Language Models, arXiv 2405.16833"
    )
    reference = "IBM/SafeLoRA model.py (SafeLoRA), config.py (SafeLoRAConfig)"
    stages = (POST_FINETUNE,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.select", "number",
                         "IBM/SafeLoRA config.py (SafeLoRAConfig): select_layers_type"),
        ReferenceSetting("defense_args.threshold", 0.5, "IBM/SafeLoRA config.py (SafeLoRAConfig)"),
        ReferenceSetting("defense_args.num_proj_layers", 10,
                         "IBM/SafeLoRA config.py (SafeLoRAConfig)"),
    )

    @dataclass
    class Options:
        select: str = "number"  # "number" | "threshold" (config.py select_layers_type: number)
        threshold: float = 0.5  # cosine cut for select: threshold (config.py threshold: 0.5)
        num_proj_layers: int = 10  # k for select: number (config.py num_proj_layers: 10)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        opts = self.options
        if opts.select not in SELECT:
            raise ConfigError(
                f"defense_args.select of 'safelora' must be one of {', '.join(SELECT)}, "
                f"got {opts.select!r}"
            )
        if not -1.0 <= opts.threshold <= 1.0:
            raise ConfigError("defense_args.threshold of 'safelora' is a cosine: in [-1, 1]")
        if opts.num_proj_layers < 1:
            raise ConfigError("defense_args.num_proj_layers of 'safelora' must be >= 1")
        self._report: dict[str, Any] = {}

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        layers = require_lora(model, self.name)
        vectors = alignment_vectors(ctx, self.name)
        opts = self.options
        cosines: dict[str, float] = {}
        projected_b: dict[str, torch.Tensor] = {}  # C·B, [out × r]: kept instead of C (out²)
        missing: list[str] = []
        with torch.no_grad():
            for name, layer in layers.items():
                if name not in vectors:
                    missing.append(name)
                    continue
                a, b, _ = lora_factors(layer)
                v = vectors[name].to(b.device)
                if v.shape != (b.shape[0], a.shape[1]):
                    raise ConfigError(
                        f"safelora: alignment vector of {name} has shape {tuple(v.shape)}, the "
                        f"LoRA delta {(b.shape[0], a.shape[1])}: the aligned and fine-tuned "
                        "models must be the same architecture"
                    )
                c = projection_matrix(v)
                projected_b[name] = c @ b
                cosines[name] = projected_cosine(c, a, b)
            selected, cut = select_layers(cosines, opts.select, opts.threshold,
                                          opts.num_proj_layers)
            for name in selected:
                weight = layers[name].lora_B[ADAPTER].weight
                weight.copy_(projected_b[name].to(weight.dtype))
            pdst = [
                1.0 / (1.0 + float(torch.linalg.vector_norm(
                    layers[name].lora_B[ADAPTER].weight.float() - cb)))
                for name, cb in projected_b.items()
            ]
        self._report = {
            "select": opts.select,
            "cosine_cut": cut,
            "n_layers": len(layers),
            "n_projected": len(selected),
            "projected": selected,
            "cosines": cosines,
            "pdst": sum(pdst) / len(pdst) if pdst else None,
            "no_alignment_vector": missing,
        }
        return model

    def report(self, stage: str) -> dict[str, Any]:
        return self._report if stage == POST_FINETUNE else {}
