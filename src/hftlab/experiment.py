"""The experiment a config describes: every plug-in built with its options, and every check
across fields done, before any data are read, any model is loaded or any file is written.

``hftlab run``, ``hftlab sweep`` (``--dry-run`` too, for every run of the grid) and
:func:`hftlab.pipeline.run_pipeline` (through :class:`hftlab.context.RunContext`) build one, so a
bad setting fails as one ConfigError line while the run folder is still untouched. The model's
architecture is read from its config on the meta device (``model_shape``: no weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hftlab.attacks import ATTACKS, Attack
from hftlab.config import Config, ConfigError, TrainConfig
from hftlab.defenses import DEFENSES, Defense
from hftlab.defenses.composite import build_defense
from hftlab.distributed import check_multi_process, launched_processes
from hftlab.errors import unknown_name_message
from hftlab.judges import JUDGES, Judge
from hftlab.model import check_lora_targets, model_shape, resolve_model_path
from hftlab.tasks import TASKS, Task
from hftlab.tracking import check_tracking

T = TypeVar("T")


@dataclass(frozen=True)
class Experiment:
    """A checked config with its plug-ins: what a run needs before it loads anything."""

    config: Config
    defense: Defense
    attack: Attack
    judge: Judge
    task: Task
    model_path: str  # a loadable ``from_pretrained`` location for ``model.name``

    @property
    def finetune_train(self) -> TrainConfig:
        """The fine-tuning stage's settings as the run's defense trains it (a defense whose
        reference fine-tunes a specific adapter sets it; otherwise ``finetune.train``)."""
        return self.defense.finetune_train(self.config.finetune.train)


def build_experiment(config: Config, where: str | None = None) -> Experiment:
    """Build every plug-in of ``config`` and run every check that needs no data and no weights;
    a problem is one ConfigError (prefixed with ``where``, the config's file, when given)."""
    prefix = f"{where}: " if where else ""
    check_names(config, prefix)
    defense = _plugin(prefix, "defense_args", build_defense, config.defense, config.defense_args)
    attack = _plugin(prefix, "attack_args", ATTACKS.get(config.attack), **config.attack_args)
    judge = _plugin(prefix, "eval.judge_args", JUDGES.get(config.eval.judge),
                    **config.eval.judge_args)
    try:
        check_tracking(config.tracking)
        check_multi_process(defense, launched_processes(), config.defense_label)
        check_defense_needs(defense, config)
        check_continued_adapter(defense, config)
        model_path = resolve_model_path(config.model.name, config.resolved_cache_dir())
        check_model_fits(config, defense.finetune_train(config.finetune.train), model_path)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from exc
    return Experiment(config, defense, attack, judge, TASKS[config.finetune.task], model_path)


def _plugin(prefix: str, key: str, make: Callable[..., T], *args: Any, **options: Any) -> T:
    """``make(*args, **options)``, with a ConfigError naming the config key that holds the
    options (``defense_args``), so that a sweep's message points at the cell's setting."""
    try:
        return make(*args, **options)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}'{key}': {exc}") from exc


def check_names(config: Config, prefix: str = "") -> None:
    """Every plug-in and task the config names is registered (with a did-you-mean)."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{prefix}'{key}' {message}")

    if config.finetune.task not in TASKS:
        fail("finetune.task", unknown_name_message("task", config.finetune.task, list(TASKS)))
    for key, registry, name in (
        *(("defense", DEFENSES, name) for name in config.defense_names),
        ("attack", ATTACKS, config.attack),
        ("eval.judge", JUDGES, config.eval.judge),
    ):
        if name not in registry:
            fail(key, unknown_name_message(registry.kind, name, registry.names()))


def check_defense_needs(defense: Defense, config: Config) -> None:
    """The data a defense trains on beyond the user's upload are configured."""
    if defense.needs_provider_harmful and config.provider_harmful is None:
        raise ConfigError(
            f"defense '{config.defense_label}' needs the provider's own harmful QA: set "
            "provider_harmful (e.g. provider_harmful='{kind: demo_harmful_qa, n: 90}' for "
            "the demo pack; configs/cpu_sst2.yaml uses BeaverTails rows 50-149)"
        )
    if defense.needs_alignment_data and not config.alignment.enabled:
        raise ConfigError(
            f"defense '{config.defense_label}' keeps training on the provider's alignment "
            "data during fine-tuning: set alignment.enabled: true (and alignment.data)"
        )


def check_continued_adapter(defense: Defense, config: Config) -> None:
    """A defense that keeps training the alignment LoRA needs one, trained as configured: the
    fine-tuning adapter settings must then match the alignment's, so none is set and ignored."""
    if not defense.continues_alignment_adapter():
        return
    align, finetune = config.alignment.train, defense.finetune_train(config.finetune.train)
    if not config.alignment.enabled or align.method != "lora" or finetune.method != "lora":
        raise ConfigError(
            f"defense '{config.defense_label}' keeps training the alignment LoRA during "
            "fine-tuning: it needs alignment.enabled: true and method: lora in both stages "
            "(or turn that off in its defense_args)"
        )
    if align.lora != finetune.lora:
        raise ConfigError(
            f"defense '{config.defense_label}' fine-tunes the alignment adapter itself "
            f"({align.lora}), so finetune.train.lora ({finetune.lora}) would be ignored: set "
            "finetune.train.lora equal to alignment.train.lora (or turn that off in its "
            "defense_args)"
        )


def check_model_fits(config: Config, finetune_train: TrainConfig, model_path: str) -> None:
    """The settings that depend on the model's architecture, read from its config (modules
    built on the meta device, no weights), so that a bad one fails before any data are read or
    any file is written: token lengths within its context, LoRA targets that exist.
    ``finetune_train``: the fine-tuning settings as the run's defense trains them."""
    shape = model_shape(model_path, config.model.revision, config.model.trust_remote_code)
    if shape is None:
        return
    name = config.model.name
    # the fine-tuning settings that train (a defense may replace the adapter the config gives)
    note = (f" (as defense '{config.defense_label}' sets it)"
            if finetune_train != config.finetune.train else "")
    trains = [("finetune.train", finetune_train, note)]
    if config.alignment.enabled:
        trains.insert(0, ("alignment.train", config.alignment.train, ""))
    ev = config.eval
    lengths = [
        ("eval.max_new_tokens", ev.max_new_tokens, ""),
        ("eval.task_max_new_tokens", ev.task_max_new_tokens, ""),
        ("eval.generation_max_new_tokens", ev.generation_max_new_tokens, ""),
        *((f"{key}.max_length", train.max_length, note) for key, train, note in trains),
    ]
    for key, value, note in lengths:
        if shape.context and value is not None and value > shape.context:
            raise ConfigError(
                f"'{key}'{note} is {value}, more than model {name!r} can attend to (its context "
                f"is {shape.context} tokens, max_position_embeddings); set it to at most "
                f"{shape.context}"
            )
    for key, train, note in trains:
        if train.method == "lora":
            check_lora_targets(train.lora.target_modules, f"{key}.lora.target_modules{note}",
                               shape.modules, shape.linear, name)
