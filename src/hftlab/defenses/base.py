"""Defense interface: one hook per pipeline stage, each a no-op by default.

Stages are ``"alignment"`` (the provider's safety training), ``"finetune"`` (the user's job)
and the post-fine-tuning repair. A defense overrides only the hooks of the stages it acts in
and lists those stages in ``stages`` (the alignment cache key includes the defense only when it
acts there).

A defense whose training stages keep state between steps (a stream of extra batches, a random
generator, a trace, counters) lists those attributes in ``resume_attributes``: the trainer's
checkpoints save them, so a resumed stage continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from hftlab.data.records import Example
from hftlab.registry import Plugin, Registry

if TYPE_CHECKING:
    from hftlab.config import TrainConfig
    from hftlab.context import RunContext
    from hftlab.train import Batch, SFTTrainer

ALIGNMENT, FINETUNE, POST_FINETUNE = "alignment", "finetune", "post_finetune"


@dataclass(frozen=True)
class ReferenceSetting:
    """One setting of the run the defense's reference code makes, beside hftlab's.

    ``key`` is ``defense_args.NAME`` (one of the defense's options) or a dotted config path
    (``alignment.train.lora.r``); ``reference`` its value in ``source`` (the reference file that
    sets it); ``note`` why hftlab's default or a preset differs, or what the value means.
    ``docs/defenses.md`` puts these beside the values hftlab runs (generated, test-checked).
    """

    key: str
    reference: Any
    source: str
    note: str = ""


class Defense(Plugin):
    stages: ClassVar[tuple[str, ...]] = ()
    needs_provider_harmful: ClassVar[bool] = False  # reads the config's provider_harmful set
    needs_alignment_data: ClassVar[bool] = False  # trains on alignment.data after alignment
    # what changes while a stage trains (not what setup() rebuilds: modules, frozen copies)
    resume_attributes: ClassVar[tuple[str, ...]] = ()
    # its fine-tuning loss compares to the stage-start model (adapters off: kl, ldifs, ...)
    reads_stage_start_model: ClassVar[bool] = False
    # the reference run's setup, setting by setting (docs/defenses.md, `hftlab list`)
    reference_settings: ClassVar[tuple[ReferenceSetting, ...]] = ()
    # work in a training step that the token-work floor of benchmarks/defense_overhead.py does
    # not count, each with its measured share of the step (read and shown by the benchmark)
    irreducible: ClassVar[tuple[str, ...]] = ()
    # data-parallel runs (accelerate launch, torchrun; hftlab.distributed): True where the
    # defense's passes and statistics are correct with each process on its shard of every
    # batch (tests/test_distributed.py runs it so, or it adds nothing to the trainer's step);
    # otherwise the reason a multi-process run refuses it, before any file is written
    multi_process: ClassVar[bool | str] = (
        "its training steps have not been made data-parallel")

    def multi_process_reason(self) -> str | None:
        """Why the defense cannot run data-parallel (None: it can)."""
        if self.multi_process is True:
            return None
        if isinstance(self.multi_process, str) and self.multi_process:
            return self.multi_process
        return "it declares no data-parallel support"

    def finetune_train(self, train: TrainConfig) -> TrainConfig:
        """The fine-tuning stage's training settings under this defense: the config's, unless
        the defense's reference trains a specific adapter there (Antidote's rank-256 LoRA)."""
        return train

    def continues_alignment_adapter(self) -> bool:
        """True: fine-tuning keeps training the alignment LoRA itself (loaded unmerged) instead
        of a fresh adapter on the merged aligned model (Panacea's ``single_lora``)."""
        return False

    def alignment_start(self) -> str:
        """What the alignment stage trains from: "base" (the base model), or "sft": the plain
        refusal-SFT alignment of the same ``alignment`` config (the checkpoint ``defense: sft``
        caches, reused or trained first), merged, with a fresh adapter on top (TAR's
        safeguarded start). With "sft", ``prepare_data(ALIGNMENT, ...)`` gives the defense's
        own training rows; the SFT start always trains on ``alignment.data`` as loaded."""
        return "base"

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        """Change a training set before a stage (e.g. mix in safety data)."""
        return examples

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        """Called once when a training stage starts (after the optimizer exists)."""

    def loss(self, stage: str, trainer: SFTTrainer, batch: Batch) -> torch.Tensor:
        """The training objective of one micro-batch; plain SFT cross-entropy by default."""
        return trainer.compute_loss(batch)

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        """Forward and backward for one micro-batch; gradients are left in ``.grad`` for the
        trainer's optimizer step. Override for multi-pass updates (perturbations, meta-steps)."""
        loss = self.loss(stage, trainer, batch)
        trainer.backward(loss)
        return {"loss": float(loss.detach())}

    def state_dict(self, stage: str) -> dict[str, Any]:
        """The ``resume_attributes`` as they stand, for a trainer checkpoint of ``stage``."""
        return {name: capture_state(getattr(self, name)) for name in self.resume_attributes}

    def load_state_dict(self, stage: str, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` saved (called after :meth:`setup`)."""
        for name in self.resume_attributes:
            if name not in state:
                raise KeyError(f"defense '{self.name}': the checkpoint has no '{name}'")
            setattr(self, name, restore_state(getattr(self, name), state[name]))

    def report(self, stage: str) -> dict[str, Any]:
        """What the defense wants recorded about a stage ("data", "alignment", "finetune",
        "post_finetune"): it goes into that stage's stage.json as ``defense_report``."""
        return {}

    def inference_system_prompt(self, system_prompt: str | None) -> str | None:
        """The system prompt the deployed model is served with (e.g. a secret trigger)."""
        return system_prompt

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        """Repair the fine-tuned model before deployment. ``model`` is the aligned model with
        the user's fine-tuning: PEFT-wrapped and unmerged under LoRA (return it with edited
        adapter weights and the adapter is saved), plain under full fine-tuning."""
        return model

    def cache_key(self, stage: str) -> dict[str, Any] | None:
        """What of this defense determines the output of ``stage`` (None: it does not act)."""
        if stage not in self.stages:
            return None
        return {"defense": self.name, "options": self.options_dict()}


def capture_state(value: Any) -> Any:
    """A copy of ``value`` that :func:`restore_state` can put back: random generators and
    objects with ``state_dict`` (batch streams) by their state, anything else deep-copied."""
    from hftlab.train import Resumable

    if isinstance(value, Resumable):
        return value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, np.random.Generator):
        return copy.deepcopy(value.bit_generator.state)
    if isinstance(value, random.Random):
        return value.getstate()
    return copy.deepcopy(value)


def restore_state(current: Any, saved: Any) -> Any:
    """``current`` with ``saved`` put back in place where it holds state (generators, streams),
    else ``saved`` itself, its tensors moved to where ``current``'s are (a checkpoint loads on
    the CPU)."""
    from hftlab.train import Resumable

    if isinstance(current, Resumable):
        current.load_state_dict(saved)
        return current
    if isinstance(current, torch.Generator):
        current.set_state(saved)
        return current
    if isinstance(current, np.random.Generator):
        current.bit_generator.state = saved
        return current
    if isinstance(current, random.Random):
        current.setstate(saved)
        return current
    return _placed_like(saved, current)


def _placed_like(saved: Any, current: Any) -> Any:
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor):
        return saved.to(current.device, current.dtype)
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [_placed_like(s, c) for s, c in zip(saved, current)]
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: _placed_like(v, current[k]) if k in current else v for k, v in saved.items()}
    return saved


DEFENSES: Registry[Defense] = Registry("defense")
