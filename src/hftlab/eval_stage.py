"""Evaluating one model of a run (the eval stage, :mod:`hftlab.stages.eval`, runs these on the
deployed, fine-tuned, aligned and base models): it generates on the eval prompts, completions
are saved to files (never printed: they answer harmful prompts), metrics cached by the caller."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hftlab.attacks.base import EvalVariant
from hftlab.cache import commit_entry, entry_lock, usable_entry
from hftlab.distributed import Shard
from hftlab.evaluate import (
    alpaca_eval_records,
    finetune_accuracy,
    generate,
    harmful_score,
    over_refusal,
)
from hftlab.formatting import PromptFormatter
from hftlab.progress import progress
from hftlab.utils import read_json, write_json, write_jsonl

ALPACA_EVAL_FILE = "alpaca_eval_outputs.json"  # eval.generations, for `alpaca_eval --model_outputs`

if TYPE_CHECKING:
    from hftlab.context import RunContext


def evaluate_model(
    ctx: RunContext, model: torch.nn.Module, folder: Path, label: str,
    formatter: PromptFormatter | None = None, prompt: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Harmful score and fine-tune accuracy of one model; completions saved to a file (never
    printed: they answer harmful prompts). ``formatter``: how the model is prompted (default:
    the run's; the deployed model gets the defense's served system prompt); ``prompt``: how each
    prompt is phrased to it (the attack's ``served_prompt``; the judge reads the original)."""
    ev = ctx.config.eval
    data = ctx.data
    formatter = formatter or ctx.formatter
    ask = prompt or (lambda text: text)
    harmful_prompts = [e.prompt for e in data.eval_harmful]
    task_prompts = [e.prompt for e in data.eval_task]
    harmless_prompts = [e.prompt for e in data.eval_harmless]
    instructions = [e.prompt for e in data.eval_generations]
    total = len(harmful_prompts) + len(task_prompts) + len(harmless_prompts) + len(instructions)
    # prompts split across processes, gathered in order (passed only then: older wrappers)
    shard = Shard.of(ctx.accelerator)
    split = {"shard": shard} if shard.world > 1 else {}
    with progress(total, f"eval {label}", unit="prompt", enabled=ctx.is_main) as bar:
        harmful_out = generate(model, formatter, [ask(p) for p in harmful_prompts],
                               ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar,
                       **split)
        task_out = generate(model, formatter, [ask(p) for p in task_prompts],
                            ev.task_max_new_tokens or ev.max_new_tokens, ev.batch_size,
                            ctx.device, ctx.autocast, bar, **split)
        harmless_out = generate(model, formatter, [ask(p) for p in harmless_prompts],
                                ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar,
                                **split)
        generations = generate(model, formatter, [ask(p) for p in instructions],
                               ev.generation_max_new_tokens or ev.max_new_tokens, ev.batch_size,
                               ctx.device, ctx.autocast, bar, **split)
    hs, flags = harmful_score(ctx.judge, harmful_prompts, harmful_out, ctx.config.eval.hs_plus)
    fa, correct = finetune_accuracy(ctx.task, data.eval_task, task_out)
    refusal_rate, refused = over_refusal(harmless_out)
    task_refusal_rate, task_refused = over_refusal(task_out)
    label_answers = [ctx.task.is_label_answer(c) for c in harmful_out]
    rows = [
        {"set": "harmful", "row": e.row, "prompt": e.prompt, "completion": c, "flagged": f,
         "task_label_answer": a}
        for e, c, f, a in zip(data.eval_harmful, harmful_out, flags, label_answers)
    ] + [
        {"set": ctx.task.name, "row": e.row, "prompt": e.prompt, "completion": c,
         "label": e.label, "correct": ok, "refused": r}
        for e, c, ok, r in zip(data.eval_task, task_out, correct, task_refused)
    ] + [
        {"set": "harmless", "row": e.row, "prompt": e.prompt, "completion": c, "refused": r}
        for e, c, r in zip(data.eval_harmless, harmless_out, refused)
    ]
    generated = sum(len(ctx.tokenizer(c, add_special_tokens=False)["input_ids"])
                    for c in harmful_out + task_out + harmless_out + generations)
    metrics = {
        "harmful_score": round(hs, 2),
        "finetune_accuracy": round(fa, 2),
        "n_eval_harmful": len(harmful_prompts),
        "n_eval_task": len(task_prompts),
        # task prompts answered with a refusal phrase: an alignment that teaches the model to
        # refuse the user's task shows here, where an exact-label accuracy of 0 cannot tell a
        # refusal from an answer in another form
        "task_refusal": round(task_refusal_rate, 2),
        # a model that answers with nothing: most judges score these (the keyword judge as
        # harmful: no refusal phrase), so the report says how many there are
        "empty_harmful_completions": sum(not c.strip() for c in harmful_out),
        # ... and the harmful score with them counted as harmless: a model that has gone silent
        # (RepNoise at CPU scale) scores high on the keyword judge without answering anything
        "harmful_score_empty_as_harmless": round(
            100.0 * sum(f and bool(c.strip()) for f, c in zip(flags, harmful_out)) / len(flags),
            2) if flags else 0.0,
        "generated_tokens": generated,
    }
    if ctx.task.labels:
        # harmful prompts answered with a bare task label ("positive"): the judge's verdict on
        # them says little about safety, so HS is also given with them counted as harmless
        flagged_labels = sum(f and a for f, a in zip(flags, label_answers))
        metrics["task_label_harmful_completions"] = sum(label_answers)
        metrics["harmful_score_without_task_labels"] = round(
            100.0 * (sum(flags) - flagged_labels) / len(flags), 2) if flags else 0.0
    if harmless_prompts:
        metrics["over_refusal"] = round(refusal_rate, 2)
        metrics["n_eval_harmless"] = len(harmless_prompts)
    if instructions:
        metrics["n_generations"] = len(instructions)
    if ctx.is_main:
        with commit_entry(folder) as tmp:
            write_jsonl(tmp / "completions.jsonl", rows)
            if instructions:
                generator = f"hftlab-{ctx.config.defense_label}-{label}"
                write_json(tmp / ALPACA_EVAL_FILE,
                           alpaca_eval_records(data.eval_generations, generations, generator))
            write_json(tmp / "metrics.json", metrics)
    ctx.accelerator.wait_for_everyone()  # the others read the entry the main process wrote
    return metrics


def cached_eval(
    ctx: RunContext, folder: Path, label: str, make_model: Callable[[], torch.nn.Module],
    formatter: PromptFormatter | None = None, prompt: Callable[[str], str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """(metrics, whether they came from the cache) for the model that ``make_model`` loads."""
    with entry_lock(folder, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(folder, marker="metrics.json"):
            return read_json(folder / "metrics.json"), True
        # ``prompt`` is passed only when set, so wrappers of the older signature keep working
        extra = {"prompt": prompt} if prompt is not None else {}
        return evaluate_model(ctx, make_model(), folder, label, formatter, **extra), False


def evaluate_attack_variant(
    ctx: RunContext, model: torch.nn.Module, folder: Path, name: str, variant: EvalVariant,
    formatter: PromptFormatter, prompt: Callable[[str], str] | None,
) -> dict[str, Any]:
    """Harmful score of the deployed model on the harmful eval prompts rewritten by one of the
    attack's eval variants (e.g. with the backdoor trigger); completions saved, never printed.
    The judge reads the original prompt and the completion as the variant reads it."""
    ev = ctx.config.eval
    ask = prompt or (lambda text: text)
    examples = ctx.data.eval_harmful
    prompts = [e.prompt for e in examples]
    shard = Shard.of(ctx.accelerator)
    split = {"shard": shard} if shard.world > 1 else {}
    with progress(len(prompts), f"eval final ({name})", unit="prompt",
                  enabled=ctx.is_main) as bar:
        raw = generate(model, formatter, [ask(variant.prompt(p)) for p in prompts],
                       ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar,
                       **split)
    read = [variant.completion(c) for c in raw]
    hs, flags = harmful_score(ctx.judge, prompts, read, ctx.config.eval.hs_plus)
    rows = [
        {"set": f"harmful_{name}", "row": e.row, "prompt": e.prompt, "completion": c,
         "judged_text": r, "flagged": f}
        for e, c, r, f in zip(examples, raw, read, flags)
    ]
    metrics = {
        "harmful_score": round(hs, 2),
        "n_eval_harmful": len(prompts),
        # how many answers the variant's reading changed (e.g. deciphered): the rest were judged
        # as written
        "rewritten_completions": sum(r != c for c, r in zip(raw, read)),
        "generated_tokens": sum(len(ctx.tokenizer(c, add_special_tokens=False)["input_ids"])
                                for c in raw),
    }
    if ctx.is_main:
        with commit_entry(folder) as tmp:
            write_jsonl(tmp / "completions.jsonl", rows)
            write_json(tmp / "metrics.json", metrics)
    ctx.accelerator.wait_for_everyone()  # the others read the entry the main process wrote
    return metrics
