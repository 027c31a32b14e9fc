"""Weight-space pieces the post-fine-tuning repairs share (SafeLoRA, SafeMERGE, RESTA,
Antidote): the LoRA layers of a PEFT model by module name, their deltas ΔW = scale·B·A in
fp32, and the alignment vector V = W_aligned − W_base read from the alignment stage's cached
checkpoint (never written: repairs leave the alignment cache as they found it).

Module names are the plain model's (``model.layers.0.self_attn.q_proj``), without PEFT's
``base_model.model.`` prefix, so a fine-tuning adapter and the alignment vector line up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hftlab.config import ConfigError

if TYPE_CHECKING:
    from hftlab.context import RunContext

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def plain_name(name: str) -> str:
    """A module's name in the plain model (PEFT's wrapper prefix removed)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{plain module name: PEFT LoRA layer} for every layer carrying the default adapter."""
    from peft.tuners.lora import LoraLayer

    return {
        plain_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def lora_factors(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r × in], B [out × r], scale) of a LoRA layer's default adapter, A and B in fp32."""
    a = layer.lora_A[ADAPTER].weight.detach().float()
    b = layer.lora_B[ADAPTER].weight.detach().float()
    return a, b, float(layer.scaling[ADAPTER])


def lora_delta(layer: torch.nn.Module) -> torch.Tensor:
    """ΔW = scale·B·A of a LoRA layer, in fp32 ([out × in], like the base weight)."""
    a, b, scale = lora_factors(layer)
    return scale * (b @ a)


def require_lora(model: torch.nn.Module, who: str) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers, or one error saying the defense repairs LoRA fine-tuning."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(
            f"defense '{who}' repairs a LoRA fine-tuning adapter; set finetune.train.method: lora"
        )
    return layers


def alignment_checkpoint(ctx: RunContext, who: str) -> Path:
    """The alignment stage's saved model folder (adapter or full weights) in the cache."""
    cache = ctx.stage_info("align").get("cache")
    if not cache:
        raise ConfigError(
            f"defense '{who}' needs the aligned model's weights: set alignment.enabled: true"
        )
    return Path(cache) / "model"


def alignment_vectors(ctx: RunContext, who: str) -> Mapping[str, torch.Tensor]:
    """V = W_aligned − W_base per linear module, fp32, on ``ctx.device``.

    LoRA alignment: V = scale·B·A computed from the saved adapter when read (exact; the merged
    bf16 weights would round it). Full alignment: the difference of the saved and base weights for
    every 2-D weight except embeddings and the output head."""
    folder = alignment_checkpoint(ctx, who)
    if (folder / "adapter_config.json").is_file():
        return adapter_vectors(folder, ctx.device)
    from safetensors.torch import load_file

    base = {plain_name(n): p for n, p in ctx.base_model().named_parameters()}
    vectors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key, aligned in load_file(str(path)).items():
            if aligned.dim() != 2 or "embed" in key or "lm_head" in key or key not in base:
                continue
            module = key.removesuffix(".weight")
            vectors[module] = (aligned.float().to(ctx.device) - base[key].detach().float())
    if not vectors:
        raise ConfigError(f"{folder}: no linear weights found in the aligned checkpoint")
    return vectors


Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r × in], B [out × r], scale)


def adapter_factors(folder: Path, device: torch.device | str = "cpu") -> dict[str, Factors]:
    """{plain module name: (A, B, scale)} of a saved PEFT LoRA adapter folder, fp32."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = plain_name(key.split(marker)[0])
                parts.setdefault(module, {})[part] = tensor.float().to(device)
    factors = {}
    for module, found in parts.items():
        a, b = found["lora_A"], found["lora_B"]
        rank = a.shape[0]
        alpha = config.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1],
                                                    config["lora_alpha"])
        factors[module] = (a, b, alpha / (rank ** 0.5 if config.get("use_rslora") else rank))
    return factors


class LazyDeltas(Mapping[str, torch.Tensor]):
    """scale·B·A per module, computed when read: one full-size matrix in memory at a time
    (all of a 7B model's V in fp32 at once would be ~26 GB)."""

    def __init__(self, factors: dict[str, Factors]) -> None:
        self.factors = factors

    def __getitem__(self, module: str) -> torch.Tensor:
        a, b, scale = self.factors[module]
        return scale * (b @ a)

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)


def adapter_vectors(folder: Path, device: torch.device | str = "cpu") -> Mapping[str, torch.Tensor]:
    """scale·B·A per module of a saved PEFT LoRA adapter folder (no base model needed)."""
    return LazyDeltas(adapter_factors(folder, device))


def layer_index(module: str) -> int | None:
    """The decoder block a module belongs to (``model.layers.7.mlp.up_proj`` → 7)."""
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
