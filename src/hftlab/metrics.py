"""``metrics.json``: what a finished run reports, collected from its stages' records into a
:class:`~hftlab.run_metrics.RunMetrics`."""

from __future__ import annotations

import platform
from typing import Any

import torch

from hftlab import __version__
from hftlab.context import RunContext
from hftlab.run_metrics import (
    AttackInfo,
    CurvePoint,
    DataSummary,
    Drift,
    FinalScores,
    JudgeInfo,
    Repair,
    RunMetrics,
    Scores,
    StageTiming,
    VariantScore,
)
from hftlab.stats import rate_interval
from hftlab.utils import read_json


def library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "hftlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def attack_eval(variants: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each eval variant's harmful score with its sample size, 95% Wilson interval and how many
    answers the variant's reading changed (absent in evaluations cached before it was counted)."""
    if not variants:
        return None
    return {
        name: {"harmful_score": v["harmful_score"], "n": v["n_eval_harmful"],
               "ci95": rate_interval(v["harmful_score"], v["n_eval_harmful"]),
               **({"rewritten_completions": v["rewritten_completions"]}
                  if "rewritten_completions" in v else {})}
        for name, v in variants.items()
    }


def finetune_precision(ctx: RunContext, finetune: dict[str, Any]) -> str | None:
    """The precision the fine-tuning stage trained in, when it is not the run's (from its stage
    record: a skipped fine-tuning trained nothing and serves the aligned model)."""
    trained = finetune.get("precision")
    return trained if trained not in (None, ctx.precision) else None


def collect_metrics(ctx: RunContext, stage_names: tuple[str, ...]) -> RunMetrics:
    cfg = ctx.config
    ev = ctx.stage_info("eval")["results"]
    data_info = ctx.stage_info("data")
    ft_dir = ctx.stage_dir("finetune")
    stages = {str(name): StageTiming(**ctx.stage_info(name)["timing"]) for name in stage_names}
    align = ctx.stage_info("align")
    if align.get("train_seconds"):
        stages["align"].train_seconds = align["train_seconds"]
        stages["align"].train_tokens = align.get("train_tokens")
        stages["align"].seconds_per_step = align.get("seconds_per_step")
        stages["align"].cached = align.get("cached", False)
    finetune = ctx.stage_info("finetune")
    stages["finetune"].seconds_per_step = finetune["seconds_per_step"]
    stages["finetune"].train_seconds = finetune["train_seconds"]
    stages["finetune"].cached = finetune.get("cached", False)
    # the defense left no uploaded row: the aligned model served
    stages["finetune"].skipped = finetune.get("skipped") or None
    final = ev["final"]
    finetuned = repair = None
    if "finetuned" in ev:  # a post-fine-tuning repair ran: before, after and the change
        before = ev["finetuned"]
        finetuned = Scores(before["harmful_score"], before["finetune_accuracy"],
                           harmful_score_without_task_labels=before.get(
                               "harmful_score_without_task_labels"),
                           task_refusal=before.get("task_refusal"))
        repair = Repair(
            harmful_score_change=round(final["harmful_score"] - before["harmful_score"], 2),
            finetune_accuracy_change=round(
                final["finetune_accuracy"] - before["finetune_accuracy"], 2),
            report=ctx.stage_info("post_finetune").get("defense_report", {}),
        )
    drift = read_json(ft_dir / "drift.json")
    variants = attack_eval(ctx.stage_info("eval").get("attack_eval"))
    return RunMetrics(
        task=ctx.task.name, defense=cfg.defense_label, model=cfg.model.name, seed=cfg.seed,
        precision=ctx.precision, device=str(ctx.device),
        finetune_precision=finetune_precision(ctx, finetune),
        judge=JudgeInfo.from_dict(ctx.judge.describe()),
        final=FinalScores(
            harmful_score=final["harmful_score"],
            finetune_accuracy=final["finetune_accuracy"],
            # refusals of harmless prompts (eval.harmless), when configured
            over_refusal=final.get("over_refusal"),
            harmful_score_ci95=rate_interval(final["harmful_score"], final["n_eval_harmful"]),
            finetune_accuracy_ci95=rate_interval(final["finetune_accuracy"],
                                                 final["n_eval_task"]),
            over_refusal_ci95=rate_interval(final["over_refusal"], final["n_eval_harmless"])
            if "over_refusal" in final else None,
            n_eval_harmful=final["n_eval_harmful"], n_eval_task=final["n_eval_task"],
            n_eval_harmless=final.get("n_eval_harmless"),
            empty_harmful_completions=final.get("empty_harmful_completions"),
            harmful_score_empty_as_harmless=final.get("harmful_score_empty_as_harmless"),
            task_label_harmful_completions=final.get("task_label_harmful_completions"),
            harmful_score_without_task_labels=final.get("harmful_score_without_task_labels"),
            task_refusal=final.get("task_refusal"),
        ),
        aligned=Scores(ev["aligned"]["harmful_score"], ev["aligned"]["finetune_accuracy"],
                       ev["aligned"].get("over_refusal"),
                       ev["aligned"].get("harmful_score_without_task_labels"),
                       ev["aligned"].get("task_refusal")),
        base=Scores(ev["base"]["harmful_score"], ev["base"]["finetune_accuracy"],
                    harmful_score_without_task_labels=ev["base"].get(
                        "harmful_score_without_task_labels"),
                    task_refusal=ev["base"].get("task_refusal"))
        if "base" in ev else None,
        finetuned=finetuned, repair=repair,
        attack=AttackInfo.from_dict(data_info["attack"]),
        # the attack's extra evaluations of the deployed model (e.g. backdoor: with the trigger)
        attack_eval={k: VariantScore(**v) for k, v in variants.items()} if variants else None,
        attack_serving=ctx.stage_info("eval").get("serving"),
        data=DataSummary(counts=data_info["counts"],
                         # what the defense did to the upload (guardrail: rows screened, ...)
                         defense_report=data_info.get("defense_report") or None,
                         overlaps=data_info["overlaps"]),
        curves=[CurvePoint(**p) for p in read_json(ft_dir / "curves.json")],
        drift=Drift(**drift) if drift else None,
        stages=stages,
        alpaca_eval_outputs="eval/alpaca_eval_outputs.json"
        if final.get("n_generations") else None,
        versions=library_versions(),
    )
