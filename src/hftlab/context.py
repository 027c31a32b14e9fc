"""What the stages share: the run's config, devices and precision, tokenizer and plug-ins, and
every data set the run reads, loaded once, split into its roles and checked for overlaps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hftlab.attacks import AttackInputs
from hftlab.config import Config, TrainConfig
from hftlab.data.loaders import load_examples
from hftlab.data.records import Example, check_no_shared_prompt, normalize_prompt
from hftlab.data.spec import DataSpec
from hftlab.defenses import ALIGNMENT, FINETUNE, Defense
from hftlab.devices import resolve_precision
from hftlab.experiment import Experiment, build_experiment
from hftlab.experiment import check_continued_adapter as check_continued_adapter
from hftlab.experiment import check_model_fits as check_model_fits
from hftlab.formatting import PromptFormatter, Tokenized
from hftlab.model import load_model, load_tokenizer
from hftlab.tracking import Tracker
from hftlab.train import autocast_context
from hftlab.utils import read_json

log = logging.getLogger(__name__)
MARKER = "stage.json"


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

    def __init__(self, config: Config, run_dir: Path, force: bool = False,
                 experiment: Experiment | None = None) -> None:
        """``experiment``: the config's plug-ins, built and checked already (by
        :func:`hftlab.experiment.build_experiment`); built here when not given."""
        from accelerate import Accelerator

        self.experiment = experiment or build_experiment(config)
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
        # the fine-tuning stage's (finetune.precision; the run's when unset)
        self.finetune_precision = resolve_precision(
            config.finetune.precision or config.model.precision, self.device)
        self.defense: Defense = self.experiment.defense
        self.attack = self.experiment.attack
        self.judge = self.experiment.judge
        self.task = self.experiment.task
        self.model_path = self.experiment.model_path
        self.tokenizer = load_tokenizer(self.model_path, config.model)
        self.formatter = PromptFormatter(self.tokenizer, config.model)
        self._data: RunData | None = None
        # the run's experiment tracker (the pipeline starts one when tracking is configured)
        self.tracker: Tracker = Tracker()

    # ----------------------------------------------------------------------------- helpers

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> Any:
        return autocast_context(self.device, self.precision)

    def finetune_autocast(self) -> Any:
        return autocast_context(self.device, self.finetune_precision)

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

    def base_model(self, full_training: bool = False, precision: str | None = None
                   ) -> torch.nn.Module:
        """The original model, stored for ``precision`` (the run's when None)."""
        return load_model(self.model_path, self.config.model, self.device,
                          precision or self.precision, full_training)

    @property
    def finetune_train(self) -> TrainConfig:
        """The fine-tuning stage's settings as the run's defense trains it (a defense whose
        reference fine-tunes a specific adapter sets it; otherwise ``finetune.train``)."""
        return self.experiment.finetune_train

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
        """The alignment stage's cache key (see :class:`hftlab.stages.align.AlignInputs`)."""
        from hftlab.stages.align import align_inputs

        return align_inputs(self, start).key()

    def finetune_key(self) -> str:
        """The fine-tuning stage's cache key (see :class:`hftlab.stages.finetune.FinetuneInputs`):
        runs that differ only after it (a repair, the evaluation) share it."""
        from hftlab.stages.finetune import finetune_inputs

        return finetune_inputs(self).key()

    @property
    def alignment_seed(self) -> int:
        seed = self.config.alignment.seed
        return self.config.seed if seed is None else seed

    def eval_key(self) -> str:
        """The evaluation's cache key (see :class:`hftlab.stages.eval.EvalInputs`)."""
        from hftlab.stages.eval import eval_inputs

        return eval_inputs(self).key()


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
