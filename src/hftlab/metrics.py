"""``metrics.json``: what a finished run reports."""

from __future__ import annotations

import platform
from typing import Any

import torch

from hftlab import __version__
from hftlab.context import RunContext
from hftlab.stats import wilson
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


def rate_interval(percent: float, n: int) -> list[float]:
    """95% Wilson interval of a percentage measured on n prompts."""
    return list(wilson(round(percent / 100 * n), n))


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


def collect_metrics(ctx: RunContext, stage_names: tuple[str, ...]) -> dict[str, Any]:
    cfg = ctx.config
    ev = ctx.stage_info("eval")["results"]
    data_info = ctx.stage_info("data")
    ft_dir = ctx.stage_dir("finetune")
    stages = {name: ctx.stage_info(name)["timing"] for name in stage_names}
    align = ctx.stage_info("align")
    if align.get("train_seconds"):
        stages["align"]["train_seconds"] = align["train_seconds"]
        stages["align"]["train_tokens"] = align.get("train_tokens")
        stages["align"]["seconds_per_step"] = align.get("seconds_per_step")
        stages["align"]["cached"] = align.get("cached", False)
    finetune = ctx.stage_info("finetune")
    stages["finetune"]["seconds_per_step"] = finetune["seconds_per_step"]
    stages["finetune"]["train_seconds"] = finetune["train_seconds"]
    stages["finetune"]["cached"] = finetune.get("cached", False)
    if finetune.get("skipped"):  # the defense left no uploaded row: the aligned model served
        stages["finetune"]["skipped"] = finetune["skipped"]
    repair = None
    if "finetuned" in ev:  # a post-fine-tuning repair ran: before, after and the change
        repair = {
            "before.harmful_score": ev["finetuned"]["harmful_score"],
            "before.finetune_accuracy": ev["finetuned"]["finetune_accuracy"],
            "harmful_score_change": round(
                ev["final"]["harmful_score"] - ev["finetuned"]["harmful_score"], 2),
            "finetune_accuracy_change": round(
                ev["final"]["finetune_accuracy"] - ev["finetuned"]["finetune_accuracy"], 2),
            "report": ctx.stage_info("post_finetune").get("defense_report", {}),
        }
    final = ev["final"]
    return {
        "harmful_score": ev["final"]["harmful_score"],
        "harmful_score_ci95": rate_interval(final["harmful_score"], final["n_eval_harmful"]),
        "finetune_accuracy_ci95": rate_interval(final["finetune_accuracy"],
                                                final["n_eval_task"]),
        "finetune_accuracy": ev["final"]["finetune_accuracy"],
        "aligned.harmful_score": ev["aligned"]["harmful_score"],
        "aligned.finetune_accuracy": ev["aligned"]["finetune_accuracy"],
        "base.harmful_score": ev["base"]["harmful_score"] if "base" in ev else None,
        "base.finetune_accuracy": ev["base"]["finetune_accuracy"] if "base" in ev else None,
        "finetuned.harmful_score": repair["before.harmful_score"] if repair else None,
        "finetuned.finetune_accuracy": repair["before.finetune_accuracy"] if repair else None,
        "repair": repair,
        # refusals of harmless prompts (eval.harmless), when configured
        "over_refusal": final.get("over_refusal"),
        "over_refusal_ci95": rate_interval(final["over_refusal"], final["n_eval_harmless"])
        if "over_refusal" in final else None,
        "aligned.over_refusal": ev["aligned"].get("over_refusal"),
        "n_eval_harmless": final.get("n_eval_harmless"),
        "alpaca_eval_outputs": "eval/alpaca_eval_outputs.json"
        if final.get("n_generations") else None,
        "judge": ctx.judge.describe(),
        "task": ctx.task.name,
        "n_eval_harmful": ev["final"]["n_eval_harmful"],
        "empty_harmful_completions": final.get("empty_harmful_completions"),
        "harmful_score_empty_as_harmless": final.get("harmful_score_empty_as_harmless"),
        # classification tasks: harmful prompts answered with a bare task label, and HS with
        # those counted as harmless (the keyword judge flags them: no refusal phrase)
        "task_label_harmful_completions": final.get("task_label_harmful_completions"),
        "harmful_score_without_task_labels": final.get("harmful_score_without_task_labels"),
        "n_eval_task": ev["final"]["n_eval_task"],
        "defense": cfg.defense_label,
        "attack": data_info["attack"],
        # the attack's extra evaluations of the deployed model (e.g. backdoor: with the trigger)
        "attack_eval": attack_eval(ctx.stage_info("eval").get("attack_eval")),
        "attack_serving": ctx.stage_info("eval").get("serving"),
        "data_counts": data_info["counts"],
        # what the defense did to the upload (guardrail: rows screened, dropped, leaked)
        "data_defense_report": data_info.get("defense_report") or None,
        "overlaps": data_info["overlaps"],
        "curves": read_json(ft_dir / "curves.json"),
        "drift": read_json(ft_dir / "drift.json"),
        "stages": stages,
        "precision": ctx.precision,
        "device": str(ctx.device),
        "model": cfg.model.name,
        "seed": cfg.seed,
        "versions": library_versions(),
    }
