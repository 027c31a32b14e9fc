"""Guardrail moderation: a judge screens the uploaded fine-tuning data and the flagged rows are
dropped before fine-tuning (survey §"guardrail moderation"; the filter that Virus, Huang et al.
2025, arXiv 2501.17433, is built to evade).

Follows git-disl/Virus ``trainer.py`` (``MetaAttackFinetuneTrainer.init``, ``--moderation True``
in ``script/finetune/*moderation_finetune*.sh``): every training row, i.e. the (instruction,
response) pair, goes through the moderation model; flagged rows are removed, the rest are the
fine-tuning set; it reports the share of harmful rows that leak through (its "false negative
ratio") and of benign rows removed ("false positive ratio").

Departures:

- the judge is any registered one (``hftlab.judges``): ``judge`` names it (with ``judge_args``),
  ``None`` uses the run's evaluation judge (``eval.judge``); the reference uses Llama Guard 2 8B
  (``LlamaGuardModeration``, flagged when it answers "unsafe").

When every row is flagged, fine-tuning is skipped as in the reference and the aligned model is
served (the fine-tuning stage records ``skipped``; a warning is logged).

The screening acts on the upload alone, and the fine-tuning stage's cache key fingerprints the
upload after screening, so the guardrail adds nothing else to that key: when it drops no row,
its run trains exactly what ``sft`` trains on the same seed and shares that stage and its
evaluation instead of repeating them.

The keyword judge as a guardrail: it calls an answer harmful when it holds no refusal phrase, so
it flags nearly every ordinary task answer (a sentiment label such as "positive" has none) along
with the harmful rows. That is what that judge honestly does as a filter; the data stage report
shows it as ``benign_dropped`` / ``false_positive_rate``, a warning is logged when most benign
rows go, and with a classification task it may leave nothing to fine-tune on.
A moderation-model judge is the meaningful choice here.

In a defense list the guardrail screens the rows the members before it produced (e.g. the safety
rows of ``backdoor_align``); list it first to screen the user's upload alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.judges import JUDGES, Judge
from hftlab.registry import unknown_name_message

if TYPE_CHECKING:
    from hftlab.context import RunContext

log = logging.getLogger(__name__)


def screen(judge: Judge, examples: list[Example]) -> list[bool]:
    """The judge's verdict on each row's (prompt, response); True = harmful (dropped)."""
    flags = judge.flag([e.prompt for e in examples], [e.response for e in examples])
    if len(flags) != len(examples):
        raise ValueError(f"judge '{judge.name}' returned {len(flags)} verdicts for "
                         f"{len(examples)} rows")
    return [bool(f) for f in flags]


def screening_counts(examples: list[Example], flags: list[bool]) -> dict[str, Any]:
    """How many rows were screened and dropped, split by the rows' ground truth (is_harmful)."""
    harmful = sum(e.is_harmful for e in examples)
    benign = len(examples) - harmful
    harmful_dropped = sum(f and e.is_harmful for e, f in zip(examples, flags))
    benign_dropped = sum(f and not e.is_harmful for e, f in zip(examples, flags))
    return {
        "screened": len(examples),
        "dropped": harmful_dropped + benign_dropped,
        "kept": len(examples) - harmful_dropped - benign_dropped,
        "harmful_screened": harmful,
        "harmful_dropped": harmful_dropped,
        "harmful_leaked": harmful - harmful_dropped,  # false negatives
        "benign_screened": benign,
        "benign_dropped": benign_dropped,  # false positives
        "leak_rate": round(1 - harmful_dropped / harmful, 4) if harmful else None,
        "false_positive_rate": round(benign_dropped / benign, 4) if benign else None,
    }


@DEFENSES.register("guardrail")
class Guardrail(Defense):
    summary = "fine-tuning stage: a judge screens the uploaded rows; the flagged ones are dropped"
    paper = ("Huang et al. 2024, Harmful Fine-tuning Attacks and Defenses for LLMs: A Survey "
             "(guardrail moderation); Huang et al. 2025, Virus, arXiv 2501.17433")
    reference = "git-disl/Virus trainer.py (MetaAttackFinetuneTrainer.init, moderation=True)"
    stages = (FINETUNE,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.judge", "Llama Guard 2 8B",
                         "git-disl/Virus trainer.py (LlamaGuardModeration)",
                         "hftlab: any registered judge; null = eval.judge"),
        ReferenceSetting("finetune.n", 500,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh",
                         "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.1,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh"),
        ReferenceSetting("finetune.train.lr", 0.0001,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh",
                         "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.1,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh",
                         "hftlab fine-tunes without weight decay"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.0,
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh"),
        ReferenceSetting("finetune.train.schedule", "constant",
                         "git-disl/Virus script/finetune/hf_moderation_finetune_sst2.sh"),
        ReferenceSetting("finetune.train.max_length", 1000,
                         "git-disl/Virus train.py (model_max_length)",
                         "hftlab: 256 (Booster's train.py)"),
        ReferenceSetting("finetune.train.lora.r", 32,
                         "git-disl/Virus train.py (LoraConfig), hf_moderation_finetune_sst2.sh",
                         "the reference keeps training the alignment LoRA (--alternating "
                         "single_lora), hftlab a fresh one; CPU: r 8, α 16, all linear"),
        ReferenceSetting("finetune.train.lora.alpha", 4,
                         "git-disl/Virus train.py (LoraConfig), hf_moderation_finetune_sst2.sh",
                         "the reference keeps training the alignment LoRA (--alternating "
                         "single_lora), hftlab a fresh one; CPU: r 8, α 16, all linear"),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         "git-disl/Virus train.py (LoraConfig), hf_moderation_finetune_sst2.sh",
                         "the reference keeps training the alignment LoRA (--alternating "
                         "single_lora), hftlab a fresh one; CPU: r 8, α 16, all linear"),
        ReferenceSetting("finetune.train.lora.dropout", 0.0,
                         "git-disl/Virus train.py (LoraConfig), hf_moderation_finetune_sst2.sh"),
    )

    @dataclass
    class Options:
        judge: str | None = None  # a registered judge; None = the run's eval.judge
        judge_args: dict[str, Any] = field(default_factory=dict)  # options of that judge

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        name = self.options.judge
        if name is not None and name not in JUDGES:
            raise ConfigError("defense_args.judge of 'guardrail': "
                              + unknown_name_message("judge", name, JUDGES.names()))
        if name is None and self.options.judge_args:
            raise ConfigError(
                "defense_args.judge_args of 'guardrail' needs defense_args.judge (with no judge "
                "named the run's eval judge is used, with its own eval.judge_args)"
            )
        self._report: dict[str, Any] = {}

    def make_judge(self, ctx: RunContext) -> Judge:
        if self.options.judge is None:
            return ctx.judge
        return JUDGES.get(self.options.judge)(**self.options.judge_args)

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        if stage != FINETUNE:
            return examples
        judge = self.make_judge(ctx)
        flags = screen(judge, examples)
        counts = screening_counts(examples, flags)
        self._report = {"judge": judge.describe(), **counts}
        log.info("guardrail (%s): dropped %d of %d rows (%d of %d harmful, %d of %d benign)",
                 judge.name, counts["dropped"], counts["screened"], counts["harmful_dropped"],
                 counts["harmful_screened"], counts["benign_dropped"], counts["benign_screened"])
        if counts["benign_screened"] and 2 * counts["benign_dropped"] > counts["benign_screened"]:
            log.warning(
                "guardrail: the judge '%s' flagged %d of %d benign rows (false positives)%s",
                judge.name, counts["benign_dropped"], counts["benign_screened"],
                "; the keyword judge flags every answer without a refusal phrase"
                if judge.name == "keyword" else "",
            )
        kept = [e for e, flagged in zip(examples, flags) if not flagged]
        if not kept:
            log.warning(
                "guardrail: the judge '%s' flagged all %d uploaded rows (%d harmful, %d benign); "
                "fine-tuning is skipped and the aligned model is served%s",
                judge.name, counts["screened"], counts["harmful_screened"],
                counts["benign_screened"],
                "; the keyword judge flags every answer without a refusal phrase, ordinary task "
                "answers too: name a moderation judge in defense_args.judge"
                if judge.name == "keyword" else "",
            )
        return kept

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == "data" else {}

    def cache_key(self, stage: str) -> dict[str, Any] | None:
        # its whole effect is the screened upload, which the fine-tuning key already holds
        return None
