"""The eval stage: every model of a run (deployed, fine-tuned before a repair, aligned, base)
generates on the eval prompts; completions are saved to files (never printed: they answer
harmful prompts) and each model's metrics are cached with the stage that produced the model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hftlab.attacks.base import PROMPT_PROBE, EvalVariant
from hftlab.cache import commit_entry, entry_lock, usable_entry
from hftlab.context import RunContext
from hftlab.evaluate import (
    alpaca_eval_records,
    finetune_accuracy,
    generate,
    harmful_score,
    over_refusal,
)
from hftlab.formatting import PromptFormatter
from hftlab.model import merged
from hftlab.stage_models import aligned_model, deployed_model, finetuned_model
from hftlab.utils import read_json, stable_hash, write_json, write_jsonl

ALPACA_EVAL_FILE = "alpaca_eval_outputs.json"  # eval.generations, for `alpaca_eval --model_outputs`


def evaluate_model(
    ctx: RunContext, model: torch.nn.Module, folder: Path, label: str,
    formatter: PromptFormatter | None = None, prompt: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Harmful score and fine-tune accuracy of one model; completions saved to a file (never
    printed: they answer harmful prompts). ``formatter``: how the model is prompted (default:
    the run's; the deployed model gets the defense's served system prompt); ``prompt``: how each
    prompt is phrased to it (the attack's ``served_prompt``; the judge reads the original)."""
    from tqdm.auto import tqdm

    ev = ctx.config.eval
    data = ctx.data
    formatter = formatter or ctx.formatter
    ask = prompt or (lambda text: text)
    harmful_prompts = [e.prompt for e in data.eval_harmful]
    task_prompts = [e.prompt for e in data.eval_task]
    harmless_prompts = [e.prompt for e in data.eval_harmless]
    instructions = [e.prompt for e in data.eval_generations]
    total = len(harmful_prompts) + len(task_prompts) + len(harmless_prompts) + len(instructions)
    with tqdm(total=total, desc=f"eval {label}", disable=not ctx.is_main) as bar:
        harmful_out = generate(model, formatter, [ask(p) for p in harmful_prompts],
                               ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar)
        task_out = generate(model, formatter, [ask(p) for p in task_prompts],
                            ev.task_max_new_tokens or ev.max_new_tokens, ev.batch_size,
                            ctx.device, ctx.autocast, bar)
        harmless_out = generate(model, formatter, [ask(p) for p in harmless_prompts],
                                ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar)
        generations = generate(model, formatter, [ask(p) for p in instructions],
                               ev.generation_max_new_tokens or ev.max_new_tokens, ev.batch_size,
                               ctx.device, ctx.autocast, bar)
    hs, flags = harmful_score(ctx.judge, harmful_prompts, harmful_out, ctx.config.eval.hs_plus)
    fa, correct = finetune_accuracy(ctx.task, data.eval_task, task_out)
    refusal_rate, refused = over_refusal(harmless_out)
    label_answers = [ctx.task.is_label_answer(c) for c in harmful_out]
    rows = [
        {"set": "harmful", "row": e.row, "prompt": e.prompt, "completion": c, "flagged": f,
         "task_label_answer": a}
        for e, c, f, a in zip(data.eval_harmful, harmful_out, flags, label_answers)
    ] + [
        {"set": ctx.task.name, "row": e.row, "prompt": e.prompt, "completion": c,
         "label": e.label, "correct": ok}
        for e, c, ok in zip(data.eval_task, task_out, correct)
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
    from tqdm.auto import tqdm

    ev = ctx.config.eval
    ask = prompt or (lambda text: text)
    examples = ctx.data.eval_harmful
    prompts = [e.prompt for e in examples]
    with tqdm(total=len(prompts), desc=f"eval final ({name})", disable=not ctx.is_main) as bar:
        raw = generate(model, formatter, [ask(variant.prompt(p)) for p in prompts],
                       ev.max_new_tokens, ev.batch_size, ctx.device, ctx.autocast, bar)
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
    return metrics


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    """Evaluate the deployed model, the fine-tuned model before a repair (cached with the
    fine-tuning), the aligned model (cached with the alignment) and the original model (cached
    once per model and eval set); copy every model's completions into the run folder."""
    ev_key = ctx.eval_key()
    folder = ctx.stage_dir("eval")
    align_cache = ctx.stage_info("align").get("cache")
    plan: dict[str, tuple[Path, Callable[[], torch.nn.Module]]] = {}
    if ctx.config.eval.eval_base or not align_cache:
        base_key = stable_hash(ctx.model_key())[:16]
        plan["base"] = (ctx.cache_dir / "base_eval" / base_key / ev_key, ctx.base_model)
    if align_cache:
        plan["aligned"] = (Path(align_cache) / "eval" / ev_key, lambda: aligned_model(ctx))
    results: dict[str, Any] = {}
    generated = 0
    for name, (source, load) in plan.items():
        results[name], from_cache = cached_eval(ctx, source, name, load)
        generated += 0 if from_cache else results[name]["generated_tokens"]
        results[name]["cached"] = from_cache
        shutil.copyfile(source / "completions.jsonl", folder / f"completions_{name}.jsonl")
    if not align_cache:
        results["aligned"] = results["base"]  # alignment disabled: the aligned model is the base
    # Only the user's model is queried the attacker's way (the attack's system prompt and prompt
    # phrasing, e.g. identity_shift's AOA persona) with the defense's system prompt on top (e.g.
    # BackdoorAlign's secret trigger); the cached base/aligned evaluations above keep the run's
    # default. (ctx.eval_key() above has loaded the data, so data-stage state exists.)
    default = ctx.formatter.default_system_prompt
    served = ctx.defense.inference_system_prompt(ctx.attack.served_system_prompt(default))
    served_formatter = (
        ctx.formatter if served == default else ctx.formatter.with_system_prompt(served)
    )
    attack = ctx.attack
    ask = None if attack.served_prompt(PROMPT_PROBE) == PROMPT_PROBE else attack.served_prompt
    # The fine-tuned model's evaluation is cached with the fine-tuning (per served prompt): a
    # repair's "before" is the plain run's "final". The attack's phrasing enters the key only
    # when it rewrites prompts, so that earlier cached evaluations stay valid.
    tuned_key: dict[str, Any] = {"eval": ev_key, "system_prompt": served}
    if ask is not None:
        tuned_key["attack_prompt"] = attack.serving_key()
    tuned_source = (Path(ctx.stage_info("finetune")["cache"]) / "eval"
                    / stable_hash(tuned_key)[:16])
    repaired = bool(ctx.stage_info("post_finetune").get("repaired"))
    final_model: list[torch.nn.Module] = []  # the deployed model, loaded at most once

    def load_final() -> torch.nn.Module:
        if not final_model:
            final_model.append(deployed_model(ctx))
        return final_model[0]

    if repaired:
        # the same model before the repair, served the same way: what the repair bought and cost
        results["finetuned"], from_cache = cached_eval(
            ctx, tuned_source, "finetuned", lambda: merged(finetuned_model(ctx)),
            served_formatter, ask)
        results["finetuned"]["cached"] = from_cache
        generated += 0 if from_cache else results["finetuned"]["generated_tokens"]
        shutil.copyfile(tuned_source / "completions.jsonl",
                        folder / "completions_finetuned.jsonl")
        extra = {"prompt": ask} if ask is not None else {}
        results["final"] = evaluate_model(ctx, load_final(), folder / "final", "final",
                                          served_formatter, **extra)
        final_source, from_cache = folder / "final", False
    else:
        results["final"], from_cache = cached_eval(
            ctx, tuned_source, "final", load_final, served_formatter, ask)
        final_source = tuned_source
    results["final"]["cached"] = from_cache
    generated += 0 if from_cache else results["final"]["generated_tokens"]
    shutil.copyfile(final_source / "completions.jsonl", folder / "completions.jsonl")
    if (final_source / ALPACA_EVAL_FILE).exists():
        shutil.copyfile(final_source / ALPACA_EVAL_FILE, folder / ALPACA_EVAL_FILE)
    # The attack's extra harmful-score evaluations of the deployed model (e.g. with the backdoor
    # trigger), cached next to the final evaluation unless a repair made the final model here.
    attack_eval: dict[str, Any] = {}
    for name, variant in attack.eval_variants().items():
        variant_key = {**tuned_key, "attack": attack.serving_key(), "variant": name}
        if variant.version:
            variant_key["version"] = variant.version
        source = (folder / f"attack_{name}" if repaired
                  else tuned_source.parent / stable_hash(variant_key)[:16])
        with entry_lock(source, ctx.is_main):
            ctx.accelerator.wait_for_everyone()
            cached = not ctx.force and usable_entry(source, marker="metrics.json")
            attack_eval[name] = (
                read_json(source / "metrics.json") if cached else evaluate_attack_variant(
                    ctx, load_final(), source, name, variant, served_formatter, ask))
        attack_eval[name]["cached"] = cached
        generated += 0 if cached else attack_eval[name]["generated_tokens"]
        shutil.copyfile(source / "completions.jsonl", folder / f"completions_attack_{name}.jsonl")
    serving = {
        # a digest, not the text: a defense's served prompt may hold a secret trigger
        "system_prompt_sha256": stable_hash(served)[:16] if served is not None else None,
        "attack_prompt": attack.served_prompt("{prompt}") if ask is not None else None,
    }
    return {"results": results, "eval_key": ev_key, "tokens": generated,
            "attack_eval": attack_eval or None, "serving": serving}
