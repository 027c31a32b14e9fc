"""Several defenses in one run (``defense: [booster, lisa]``): stage hooks compose.

Rules (checked when the run starts, with one error naming the clash):

- data hooks (``prepare_data``) run in the listed order;
- in each training stage at most ONE member may own the training step (override ``loss`` /
  ``training_step``): two multi-pass update rules in one step have no agreed composition (whose
  perturbation is taken at whose weights?), so e.g. ``[vaccine, booster]`` is rejected while
  ``[booster, lisa]`` (alignment + fine-tuning) and ``[safe_instr, lisa]`` (data + step) are
  fine;
- post-fine-tuning repairs run in the listed order, each on the previous one's output;
- the served system prompt passes through every member in order;
- the alignment cache key is the alignment-stage member's own key, so ``[booster, lisa]``
  reuses the checkpoint that ``booster`` alone made;
- a member that fine-tunes the alignment LoRA itself (Booster's and Panacea's ``single_lora``,
  EWC's ``alignment_adapter``) or aligns on top of the SFT alignment (TAR) does not combine with
  a member whose loss compares to the stage-start model (KL, LDIFS, constrained SFT) or with a
  post-fine-tuning repair: they would read the wrong aligned model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError, TrainConfig
from hftlab.data.records import Example
from hftlab.defenses.base import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE, Defense

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.train import Batch, SFTTrainer

TRAINING_STAGES = (ALIGNMENT, FINETUNE)


def owns_training_step(defense: Defense, stage: str) -> bool:
    cls = type(defense)
    custom = cls.training_step is not Defense.training_step or cls.loss is not Defense.loss
    return custom and stage in defense.stages


def check_hooks_compose(members: list[Defense]) -> None:
    """A member that keeps training the alignment LoRA, or that aligns on top of the SFT
    alignment (TAR), changes what "the aligned model" and "the fine-tuning change" are: the
    other members' regularisers (the stage-start model = adapters off) and repairs (the
    fine-tuning adapter as the change) would read the wrong model, so such pairs are refused."""
    names = [m.name for m in members]
    continuing = [m.name for m in members if m.continues_alignment_adapter()]
    safeguarded = [m.name for m in members if m.alignment_start() != "base"]
    for special, what, fix in (
        (continuing, "fine-tunes the alignment LoRA itself", "set its single_lora: false"),
        (safeguarded, "aligns on top of the SFT alignment", "set its start: base"),
    ):
        others = [m.name for m in members if m.name not in special
                  and (m.reads_stage_start_model or POST_FINETUNE in m.stages)]
        if special and others:
            raise ConfigError(
                f"defense '{special[0]}' {what}, so {others} would regularise toward or repair "
                f"the wrong model; run them separately, or {fix}"
            )
    if continuing and safeguarded and continuing != safeguarded:
        raise ConfigError(f"defenses {names}: a continued alignment adapter on top of TAR's "
                          "safeguarded start is not supported; run them separately")


def build_defense(names: str | list[str], args: dict[str, Any]) -> Defense:
    """One defense from the config's ``defense`` / ``defense_args``: a name and its options, or
    a list of names with ``defense_args`` keyed by name."""
    if isinstance(names, str):
        return DEFENSES.get(names)(**args)
    if len(names) == 1:
        return DEFENSES.get(names[0])(**args.get(names[0], args))
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ConfigError(
            f"defense_args for several defenses is keyed by defense name ({', '.join(names)}); "
            f"got {unknown}: write e.g. defense_args='{{{names[0]}: {{...}}}}'"
        )
    members = [DEFENSES.get(name)(**args.get(name, {})) for name in names]
    return CompositeDefense(members)


class CompositeDefense(Defense):
    """The listed defenses acting together; see the module docstring for the rules."""

    def __init__(self, members: list[Defense]) -> None:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"defense lists {names} twice; list each defense once")
        if "sft" in names:
            raise ConfigError("'sft' means no defense; leave it out of a defense list")
        for stage in TRAINING_STAGES:
            owners = [m.name for m in members if owns_training_step(m, stage)]
            if len(owners) > 1:
                raise ConfigError(
                    f"defenses {owners} both replace the {stage} stage's training step; their "
                    "update rules do not compose, so run them separately"
                )
        check_hooks_compose(members)
        self.members = members
        self.options = None
        self.name = "+".join(names)  # type: ignore[misc]
        self.stages = tuple(dict.fromkeys(s for m in members for s in m.stages))  # type: ignore
        self.needs_provider_harmful = any(m.needs_provider_harmful for m in members)  # type: ignore
        self.needs_alignment_data = any(m.needs_alignment_data for m in members)  # type: ignore

    def multi_process_reason(self) -> str | None:
        """Data-parallel when every member is; else the first refusing member's reason."""
        for member in self.members:
            reason = member.multi_process_reason()
            if reason is not None:
                return f"its member '{member.name}': {reason}"
        return None

    def owner(self, stage: str) -> Defense | None:
        return next((m for m in self.members if owns_training_step(m, stage)), None)

    def options_dict(self) -> dict[str, Any]:
        return {m.name: m.options_dict() for m in self.members}

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        for member in self.members:
            examples = member.prepare_data(stage, examples, ctx)
        return examples

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        for member in self.members:
            if stage in member.stages:
                member.setup(stage, trainer)

    def loss(self, stage: str, trainer: SFTTrainer, batch: Batch) -> torch.Tensor:
        owner = self.owner(stage)
        return owner.loss(stage, trainer, batch) if owner else super().loss(stage, trainer, batch)

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        owner = self.owner(stage)
        if owner is None:
            return super().training_step(stage, trainer, batch)
        return owner.training_step(stage, trainer, batch)

    def state_dict(self, stage: str) -> dict[str, Any]:
        return {m.name: m.state_dict(stage) for m in self.members}

    def load_state_dict(self, stage: str, state: dict[str, Any]) -> None:
        for member in self.members:
            member.load_state_dict(stage, state[member.name])

    def report(self, stage: str) -> dict[str, Any]:
        reports = {m.name: m.report(stage) for m in self.members}
        return {name: r for name, r in reports.items() if r}

    def inference_system_prompt(self, system_prompt: str | None) -> str | None:
        for member in self.members:
            system_prompt = member.inference_system_prompt(system_prompt)
        return system_prompt

    def finetune_train(self, train: TrainConfig) -> TrainConfig:
        changed = [m.name for m in self.members if m.finetune_train(train) != train]
        if len(changed) > 1:
            raise ConfigError(f"defenses {changed} each set the fine-tuning adapter; run them "
                              "separately")
        for member in self.members:
            train = member.finetune_train(train)
        return train

    def continues_alignment_adapter(self) -> bool:
        return any(m.continues_alignment_adapter() for m in self.members)

    def alignment_start(self) -> str:
        starts = {m.alignment_start() for m in self.members} - {"base"}
        return starts.pop() if starts else "base"

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        for member in self.members:
            if POST_FINETUNE in member.stages:
                model = member.post_finetune(model, ctx)
        return model

    def cache_key(self, stage: str) -> dict[str, Any] | None:
        keys = [k for k in (m.cache_key(stage) for m in self.members) if k is not None]
        if not keys:
            return None
        return keys[0] if len(keys) == 1 else {"defenses": keys}
