"""What the stages share: the run's config, devices and precision, tokenizer and plug-ins, and
every data set the run reads, loaded once, split into its roles and checked for overlaps."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hftlab.evaluate as evaluation
from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.config import Config, ConfigError, TrainConfig
from hftlab.data.loaders import data_fingerprint, load_examples
from hftlab.data.records import Example, check_no_shared_prompt, normalize_prompt
from hftlab.data.spec import DataSpec
from hftlab.defenses import ALIGNMENT, FINETUNE, Defense
from hftlab.defenses.composite import build_defense
from hftlab.formatting import SYSTEM_PROMPT_KEY, PromptFormatter, Tokenized
from hftlab.judges import JUDGES
from hftlab.model import (
    check_lora_targets,
    load_model,
    load_tokenizer,
    model_shape,
    resolve_model_path,
)
from hftlab.tasks import TASKS
from hftlab.train import autocast_context
from hftlab.utils import read_json, stable_hash

log = logging.getLogger(__name__)
MARKER = "stage.json"


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively, else fp32."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """Every data set a run reads, loaded once and split into its roles."""

    alignment: list[Example]
    user: list[Example]
    mech_alignment: list[Example]
    mech_harmful: list[Example]
    eval_harmful: list[Example]
    eval_task: list[Example]
    provider_harmful: list[Example]
    eval_harmless: list[Example] = field(default_factory=list)
    eval_generations: list[Example] = field(default_factory=list)
    overlaps: dict[str, int] = field(default_factory=dict)


class RunContext:
    """Everything the stages share: config, folders, tokenizer, plug-ins, devices."""

    def __init__(self, config: Config, run_dir: Path, force: bool = False) -> None:
        from accelerate import Accelerator

        self.config = config
        self.run_dir = run_dir
        self.force = force
        self.cache_dir = config.resolved_cache_dir()
        self.data_root = config.resolved_data_root()
        # Mixed precision is our own autocast (see SFTTrainer.autocast), so one process can run
        # configs of different precisions; accelerate supplies devices and data parallelism.
        self.accelerator = Accelerator(mixed_precision="no")
        self.device = self.accelerator.device
        self.precision = resolve_precision(config.model.precision, self.device)
        self.defense: Defense = build_defense(config.defense, config.defense_args)
        if self.defense.needs_provider_harmful and config.provider_harmful is None:
            raise ConfigError(
                f"defense '{config.defense_label}' needs the provider's own harmful QA: set "
                "provider_harmful (e.g. provider_harmful='{kind: demo_harmful_qa, n: 90}' for "
                "the demo pack; configs/cpu_sst2.yaml uses BeaverTails rows 50-149)"
            )
        self.attack = ATTACKS.get(config.attack)(**config.attack_args)
        self.judge = JUDGES.get(config.eval.judge)(**config.eval.judge_args)
        if self.defense.needs_alignment_data and not config.alignment.enabled:
            raise ConfigError(
                f"defense '{config.defense_label}' keeps training on the provider's alignment "
                "data during fine-tuning: set alignment.enabled: true (and alignment.data)"
            )
        check_continued_adapter(self.defense, config)
        self.task = TASKS[config.finetune.task]
        self.model_path = resolve_model_path(config.model.name, self.cache_dir)
        check_model_fits(config, self.finetune_train, self.model_path)
        self.tokenizer = load_tokenizer(self.model_path, config.model)
        self.formatter = PromptFormatter(self.tokenizer, config.model)
        self._data: RunData | None = None

    # ----------------------------------------------------------------------------- helpers

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> Any:
        return autocast_context(self.device, self.precision)

    def load(self, spec: DataSpec) -> list[Example]:
        return load_examples(spec, self.data_root)

    def tokenize(self, examples: list[Example], max_length: int) -> list[Tokenized]:
        """Token ids of ``examples``; rows whose prompt alone fills ``max_length`` have nothing
        left to learn from and are dropped, with a warning that counts them."""
        items = [self.formatter.encode(e, max_length) for e in examples]
        kept = [item for item in items if item.n_supervised > 0]
        if len(kept) < len(items):
            log.warning(
                "%d of %d rows have no answer tokens left after truncation to max_length=%d "
                "and are skipped; raise train.max_length to keep them",
                len(items) - len(kept), len(items), max_length,
            )
        return kept

    def base_model(self, full_training: bool = False) -> torch.nn.Module:
        return load_model(
            self.model_path, self.config.model, self.device, self.precision, full_training
        )

    @property
    def finetune_train(self) -> TrainConfig:
        """The fine-tuning stage's settings as the run's defense trains it (a defense whose
        reference fine-tunes a specific adapter sets it; otherwise ``finetune.train``)."""
        return self.defense.finetune_train(self.config.finetune.train)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def stage_info(self, stage: str) -> dict[str, Any]:
        return read_json(self.stage_dir(stage) / MARKER)

    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = load_run_data(self)
        return self._data

    def model_key(self) -> dict[str, Any]:
        cfg = self.config.model
        return {
            "model": self.model_path,
            "revision": cfg.revision,
            "dtype": cfg.dtype,
            "attn_implementation": cfg.attn_implementation,
            "prompt_format": cfg.prompt_format,
            "system_prompt": cfg.system_prompt,
        }

    def alignment_rows(self) -> tuple[list[Example], list[Example]]:
        """The alignment stage's inputs (alignment rows after the defense's data hook, provider
        harmful QA). Read alone when the run's full data is not built yet, so grouping a sweep
        by alignment never builds users' uploads (a Virus attack optimises them)."""
        if self._data is not None:
            return self._data.alignment, self._data.provider_harmful
        cfg = self.config
        alignment = self.load(cfg.alignment.data) if cfg.alignment.enabled else []
        provider = self.load(cfg.provider_harmful) if cfg.provider_harmful else []
        return self.defense.prepare_data(ALIGNMENT, alignment, self), provider

    def alignment_key(self, start: bool = False) -> str:
        """The alignment's cache key. ``start``: the key of the plain SFT alignment that a defense
        with ``alignment_start() == "sft"`` (TAR) trains on, exactly as a ``defense: sft`` run
        keys it (``alignment.data`` as loaded, no defense); the defense's own key includes it."""
        cfg = self.config
        if start:
            alignment = self.load(cfg.alignment.data) if cfg.alignment.enabled else []
            provider_harmful, defense = [], None
        else:
            alignment, provider_harmful = self.alignment_rows()
            defense = self.defense.cache_key(ALIGNMENT)
        key = {
            **self.model_key(),
            "enabled": cfg.alignment.enabled,
            "data": data_fingerprint(alignment),
            "train": cfg.alignment.train,
            "precision": self.precision,
            "seed": self.alignment_seed,
            "defense": defense,
            "provider_harmful": data_fingerprint(provider_harmful) if defense else None,
        }
        # a defense trained on top of the SFT alignment (TAR) depends on that model too
        if not start and cfg.alignment.enabled and self.defense.alignment_start() == "sft":
            key["starts_from"] = self.alignment_key(start=True)
        return stable_hash(key)[:16]

    def finetune_key(self) -> str:
        """Everything that determines the fine-tuning stage's output (model, curves, drift):
        runs that differ only after it (a post-fine-tuning repair, the evaluation) share it."""
        cfg = self.config
        data = self.data
        if not data.user:
            # nothing left to train on (the guardrail dropped every row): the stage serves the
            # aligned model, whatever the seed or settings, so such runs share it and its eval
            return stable_hash({"alignment": self.alignment_key(), "skipped": "empty upload"})[:16]
        key: dict[str, Any] = {
            "alignment": self.alignment_key(),
            "user": data_fingerprint(data.user),
            "train": self.finetune_train,
            "mechanisms": cfg.mechanisms,
            "mechanisms_data": [data_fingerprint(data.mech_alignment),
                                data_fingerprint(data.mech_harmful)],
            # fine-tuning-stage defenses may train on these (Lisa, Panacea, ...)
            "alignment_data": data_fingerprint(data.alignment),
            "provider_harmful": data_fingerprint(data.provider_harmful),
            "seed": cfg.seed,
            "defense": self.defense.cache_key(FINETUNE),
        }
        # a row's own system prompt is trained on but not in the data fingerprint (meta)
        system_prompts = [e.meta.get(SYSTEM_PROMPT_KEY) for e in data.user]
        if any(p is not None for p in system_prompts):
            key["system_prompts"] = system_prompts
        if self.defense.continues_alignment_adapter():
            key["continues_alignment_adapter"] = True
        return stable_hash(key)[:16]

    @property
    def alignment_seed(self) -> int:
        seed = self.config.alignment.seed
        return self.config.seed if seed is None else seed

    def eval_key(self) -> str:
        ev = self.config.eval
        key = {
            "harmful": data_fingerprint(self.data.eval_harmful),
            "task": data_fingerprint(self.data.eval_task),
            "task_name": self.task.name,
            "judge": self.judge.describe(),
            "max_new_tokens": ev.max_new_tokens,
            "task_max_new_tokens": ev.task_max_new_tokens,
            "precision": self.precision,
        }
        # optional settings enter the key only when set, so older cached evaluations stay valid
        if ev.hs_plus:
            key["hs_plus"] = True
        if evaluation.EVALUATION_VERSION:
            key["evaluation_version"] = evaluation.EVALUATION_VERSION
        if self.data.eval_harmless:
            key["harmless"] = data_fingerprint(self.data.eval_harmless)
        if self.data.eval_generations:
            key["generations"] = data_fingerprint(self.data.eval_generations)
            key["generation_max_new_tokens"] = ev.generation_max_new_tokens
        return stable_hash(key)[:16]


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


# -------------------------------------------------------------------------------- the data


def load_run_data(ctx: RunContext) -> RunData:
    cfg = ctx.config
    ft = cfg.finetune
    task_rows = [ctx.task.format(e) for e in ctx.load(ft.task_data)]
    harmful_rows = ctx.load(ft.harmful_data)
    ctx.attack.prepare(ctx)
    user = ctx.attack.build(AttackInputs(task_rows, harmful_rows, ft.n, ft.poison_ratio, cfg.seed))
    mech = cfg.mechanisms
    alignment, provider_harmful = ctx.alignment_rows()
    data = RunData(
        alignment=alignment,
        user=ctx.defense.prepare_data(FINETUNE, user, ctx),
        mech_alignment=ctx.load(mech.alignment_data) if mech.every or mech.drift else [],
        mech_harmful=ctx.load(mech.harmful_data) if mech.every else [],
        eval_harmful=ctx.load(cfg.eval.harmful),
        eval_task=[ctx.task.format(e) for e in ctx.load(cfg.eval.task)],
        provider_harmful=provider_harmful,
        eval_harmless=ctx.load(cfg.eval.harmless) if cfg.eval.harmless else [],
        eval_generations=ctx.load(cfg.eval.generations) if cfg.eval.generations else [],
    )
    data.overlaps = check_disjoint(data, [e for e in user if e.is_harmful])
    return data


def check_disjoint(data: RunData, user_harmful: list[Example]) -> dict[str, int]:
    """Fail when the provider's training data and the user's harmful rows share a prompt, or a
    held-out set leaks into training; count (and report) eval prompts seen in training."""
    must_differ = [
        ("finetune.harmful_data (user)", user_harmful, "alignment.data", data.alignment),
        ("finetune.harmful_data (user)", user_harmful, "provider_harmful", data.provider_harmful),
        ("finetune.harmful_data (user)", user_harmful, "mechanisms.harmful_data",
         data.mech_harmful),
        ("alignment.data", data.alignment, "mechanisms.alignment_data", data.mech_alignment),
    ]
    for name_a, rows_a, name_b, rows_b in must_differ:
        check_no_shared_prompt(rows_a, name_a, rows_b, name_b)
    train_prompts = {normalize_prompt(e.prompt) for e in user_harmful + data.alignment}
    leaked = sum(normalize_prompt(e.prompt) in train_prompts for e in data.eval_harmful)
    if leaked:
        log.warning("%d harmful eval prompts also occur in training data (reported)", leaked)
    return {"eval_harmful_prompts_seen_in_training": leaked}
