"""The fine-tuning-as-a-service pipeline, stage by stage, talking through files on disk.

    data → align → finetune → post_finetune → eval → metrics.json

Each stage writes its artifacts into its own folder of the run directory and a ``stage.json``
marker last; a rerun skips stages whose marker exists, so an interrupted run resumes where it
stopped (``force=True`` redoes everything). Aligned checkpoints and the base model's evaluation
are cached outside the run, keyed by a hash of everything that determines them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hftlab.attacks.base import PROMPT_PROBE, EvalVariant
from hftlab.config import Config, ConfigError, dump_config, load_config
from hftlab.context import MARKER, RunContext, seed_everything
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.defenses import ALIGNMENT, FINETUNE, POST_FINETUNE
from hftlab.evaluate import (
    alpaca_eval_records,
    finetune_accuracy,
    generate,
    harmful_score,
    over_refusal,
)
from hftlab.formatting import PromptFormatter, Tokenized
from hftlab.mechanisms import MechanismTracker, embedding_drift, hidden_states
from hftlab.metrics import collect_metrics
from hftlab.model import attach_trainable, load_trained, merged, save_trained
from hftlab.train import SFTTrainer, TrainResult
from hftlab.utils import (
    atomic_dir,
    peak_rss_mb,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
    write_jsonl,
)

log = logging.getLogger(__name__)
STAGES = ("data", "align", "finetune", "post_finetune", "eval")
CHECKPOINTS = "checkpoint"  # a training stage's resumable state (config checkpoint_every)
N_TRACK_TASK = 24  # benign user rows whose loss is tracked during fine-tuning
ALPACA_EVAL_FILE = "alpaca_eval_outputs.json"  # eval.generations, for `alpaca_eval --model_outputs`


def run_pipeline(config: Config, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage and return the metrics written to ``metrics.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    guard_run_dir(config, run_dir, force)
    ctx = RunContext(config, run_dir, force)
    stage_fns: dict[str, Callable[[RunContext], dict[str, Any]]] = {
        "data": stage_data,
        "align": stage_align,
        "finetune": stage_finetune,
        "post_finetune": stage_post_finetune,
        "eval": stage_eval,
    }
    for offset, name in enumerate(STAGES):
        run_stage(ctx, name, stage_fns[name], config.seed + offset)
    metrics = collect_metrics(ctx, STAGES)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def guard_run_dir(config: Config, run_dir: Path, force: bool) -> None:
    """A run folder holds one config: resuming with another is an error, unless forced."""
    path = run_dir / "config.yaml"
    text = dump_config(config)
    changed = path.exists() and path.read_text() != text
    if changed and not force and not same_experiment(path, config):
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({path}); "
            "use another --out, or --force to redo it with this config"
        )
    if force:
        for name in (*STAGES, "metrics.json", "report.md"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    from hftlab.utils import atomic_write_text

    atomic_write_text(path, text)


def same_experiment(path: Path, config: Config) -> bool:
    """Whether a saved config describes the run ``config`` does, read as this version reads it
    (settings added since then take their defaults, so a run started by an older hftlab resumes)
    and whatever its ``checkpoint_every``: how often a stage saves is not part of the run."""
    try:
        saved = load_config(path)
    except ConfigError:
        return False
    saved.checkpoint_every = config.checkpoint_every
    return dump_config(saved) == dump_config(config)


def run_stage(
    ctx: RunContext, name: str, fn: Callable[[RunContext], dict[str, Any]], seed: int
) -> dict[str, Any]:
    marker = ctx.stage_dir(name) / MARKER
    if marker.exists():
        log.info("stage %s: done earlier, skipped", name)
        return read_json(marker)
    log.info("stage %s", name)
    ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    info = fn(ctx)
    seconds = time.perf_counter() - start
    tokens = int(info.pop("tokens", 0))
    info["timing"] = {
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's peak so far (host memory)
    }
    if torch.cuda.is_available():  # this stage's own peak on the accelerator
        info["timing"]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if ctx.is_main:
        write_json(marker, info)  # written last: its presence means the stage is complete
        shutil.rmtree(ctx.stage_dir(name) / CHECKPOINTS, ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    return info


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Build and save the user's fine-tuning data (``is_harmful`` per row) and the split counts."""
    data = ctx.data
    folder = ctx.stage_dir("data")
    write_jsonl(folder / "user_data.jsonl", [e.to_dict() for e in data.user])
    summary = {
        "attack": {**ctx.attack.describe(data.user), **ctx.attack.data_report(ctx)},
        "counts": {
            "alignment": len(data.alignment),
            "user": len(data.user),
            "user_harmful": sum(e.is_harmful for e in data.user),
            "mechanisms_alignment": len(data.mech_alignment),
            "mechanisms_harmful": len(data.mech_harmful),
            "eval_harmful": len(data.eval_harmful),
            "eval_task": len(data.eval_task),
            "provider_harmful": len(data.provider_harmful),
        },
        "overlaps": data.overlaps,
        "defense_report": ctx.defense.report("data"),
        "fingerprints": {
            "alignment": data_fingerprint(data.alignment),
            "user": data_fingerprint(data.user),
        },
    }
    return summary


def user_data(ctx: RunContext) -> list[Example]:
    return [Example.from_dict(r) for r in read_jsonl(ctx.stage_dir("data") / "user_data.jsonl")]


def train_stage(
    ctx: RunContext,
    model: torch.nn.Module,
    examples: list[Example],
    stage: str,
    seed: int,
    tracker: MechanismTracker | None = None,
) -> tuple[SFTTrainer, TrainResult]:
    """Train ``model`` on ``examples`` with the stage's settings and the run's defense; the
    tracker (if any) records a point before the first step, every k steps and at the end."""
    from tqdm.auto import tqdm

    train_cfg = getattr(ctx.config, "alignment" if stage == ALIGNMENT else "finetune").train
    items = ctx.tokenize(examples, train_cfg.max_length)
    trainer = SFTTrainer(
        model, train_cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, stage, ctx.defense, seed,
        precision=ctx.precision, context=ctx,
        checkpoint_dir=ctx.stage_dir("align" if stage == ALIGNMENT else "finetune") / CHECKPOINTS,
        checkpoint_every=ctx.config.checkpoint_every,
    )
    _, total = trainer.plan(len(items))
    if tracker is not None:
        tracker.record(trainer, None)
    with tqdm(total=total, desc=f"{stage} ({len(items)} rows)", disable=not ctx.is_main) as bar:
        result = trainer.train(items, on_step=tracker, progress=bar)
    if tracker is not None:
        tracker.finish(trainer)
    return trainer, result


def stage_align(ctx: RunContext) -> dict[str, Any]:
    """Safety alignment on refusal data, cached by a hash of everything that determines it."""
    cfg = ctx.config
    if not cfg.alignment.enabled:
        return {"cache": None, "enabled": False}
    key = ctx.alignment_key()
    target = ctx.cache_dir / "aligned" / key
    meta_path = target / "meta.json"
    if meta_path.exists() and not ctx.force:
        log.info("aligned checkpoint found in cache: %s", target)
        return {"cache": str(target), "cached": True, "key": key, **read_json(meta_path)}
    full = cfg.alignment.train.method == "full"
    seed_everything(ctx.alignment_seed)  # the adapter's init depends on the alignment seed only
    model = attach_trainable(ctx.base_model(full_training=full), cfg.alignment.train)
    trainer, result = train_stage(ctx, model, ctx.data.alignment, ALIGNMENT, ctx.alignment_seed)
    meta = {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "train_tokens": result.tokens,
        "final_loss": result.losses[-1],
        "resumed_from_step": trainer.resumed_from,  # 0: trained in one go
        "defense": ctx.defense.cache_key(ALIGNMENT),
        "defense_report": ctx.defense.report(ALIGNMENT),
    }
    if ctx.is_main:
        with atomic_dir(target) as tmp:
            save_trained(trainer.model, tmp / "model")
            write_json(tmp / "meta.json", meta)
    ctx.accelerator.wait_for_everyone()
    return {"cache": str(target), "cached": False, "key": key, "tokens": result.tokens, **meta}


def aligned_model(ctx: RunContext, full_training: bool = False) -> torch.nn.Module:
    base = ctx.base_model(full_training)
    info = ctx.stage_info("align")
    if not info.get("cache"):
        return base
    return load_trained(base, Path(info["cache"]) / "model")


def finetuned_model(ctx: RunContext) -> torch.nn.Module:
    """Aligned model plus the user's fine-tuning (still PEFT-wrapped for LoRA, unmerged); the
    aligned model itself when the fine-tuning was skipped (nothing left of the upload)."""
    model = aligned_model(ctx)
    if ctx.stage_info("finetune").get("skipped"):
        return model
    folder = ctx.stage_dir("finetune") / "model"
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    return load_trained(model, folder)


def deployed_model(ctx: RunContext) -> torch.nn.Module:
    """What the provider serves: the post-fine-tuning output if a repair ran, else the
    fine-tuned model, merged."""
    folder = ctx.stage_dir("post_finetune") / "model"
    if folder.exists():
        return load_trained(aligned_model(ctx), folder)
    model = finetuned_model(ctx)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def stage_finetune(ctx: RunContext) -> dict[str, Any]:
    """The user's job, cached like the alignment: runs that share everything up to here (e.g.
    sft and a post-fine-tuning repair of it, or one repair at several strengths) train once.
    The run folder gets links to (or copies of) the cached files."""
    key = ctx.finetune_key()
    cached = ctx.cache_dir / "finetuned" / key
    folder = ctx.stage_dir("finetune")
    if (cached / "meta.json").exists() and not ctx.force:
        log.info("fine-tuned model found in cache: %s", cached)
        link_tree(cached, folder, skip={"meta.json", "eval"})
        return {**read_json(cached / "meta.json"), "cached": True, "cache": str(cached),
                "key": key}
    info = train_finetune(ctx)
    if ctx.is_main:
        with atomic_dir(cached) as tmp:
            link_tree(folder, tmp, skip={MARKER})
            write_json(tmp / "meta.json", {k: v for k, v in info.items() if k != "tokens"})
    ctx.accelerator.wait_for_everyone()
    return {**info, "cached": False, "cache": str(cached), "key": key}


def link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Hard-link (or copy, across file systems) ``source``'s files into ``target``."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip or not path.is_file():
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.unlink()
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def train_finetune(ctx: RunContext) -> dict[str, Any]:
    """A fresh LoRA (or full FT) on the aligned model, with the survey's curves every
    ``mechanisms.every`` steps and the hidden-state drift at the end."""
    cfg = ctx.config
    mech = cfg.mechanisms
    examples = user_data(ctx)
    folder = ctx.stage_dir("finetune")
    if not examples:
        # The defense screened out every uploaded row (the guardrail flagged them all): as in
        # the reference (git-disl/Virus, moderation), nothing is fine-tuned and the aligned
        # model is what gets served and evaluated.
        log.warning("fine-tuning skipped: the defense '%s' left none of the uploaded rows; the "
                    "aligned model is served", ctx.defense.name)
        if ctx.is_main:
            write_json(folder / "curves.json", [])
            write_json(folder / "drift.json", None)
        return {"steps": 0, "train_seconds": 0.0, "seconds_per_step": None,
                "skipped": "no uploaded rows left after the defense's screening",
                "defense_report": ctx.defense.report(FINETUNE)}
    model = aligned_model(ctx, full_training=cfg.finetune.train.method == "full")
    max_len = cfg.finetune.train.max_length
    # Drift is measured on the held-out alignment prompts as the model sees them at inference.
    drift_prompts = [
        ctx.formatter.encode_prompt(e.prompt)[:max_len] for e in ctx.data.mech_alignment
    ]
    drift_items = [Tokenized(ids, len(ids)) for ids in drift_prompts]
    before = (
        hidden_states(model, drift_items, ctx.tokenizer.pad_token_id, mech.batch_size,
                      ctx.device, ctx.autocast)
        if mech.drift and drift_items
        else None
    )
    model = attach_trainable(model, cfg.finetune.train)
    tracker = None
    if mech.every:
        # the user's own benign rows: not harmful, not added by the provider's defense
        benign = [e for e in examples
                  if not e.is_harmful and "added_by" not in e.meta][:N_TRACK_TASK]
        tracker = MechanismTracker(
            mech.every,
            ctx.tokenize(benign, max_len),
            ctx.tokenize(ctx.data.mech_alignment, max_len),
            ctx.tokenize(ctx.data.mech_harmful, max_len),
            mech.batch_size,
        )
    trainer, result = train_stage(ctx, model, examples, FINETUNE, cfg.seed, tracker)
    drift = None
    if before is not None:
        after = hidden_states(trainer.model, drift_items, ctx.tokenizer.pad_token_id,
                              mech.batch_size, ctx.device, ctx.autocast)
        drift = embedding_drift(before, after)
    if ctx.is_main:
        with atomic_dir(folder / "model") as tmp:
            save_trained(trainer.model, tmp)
        write_json(folder / "curves.json", tracker.curves if tracker else [])
        write_json(folder / "drift.json", drift)
    return {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "final_loss": result.losses[-1],
        "resumed_from_step": trainer.resumed_from,  # 0: trained in one go
        "tokens": result.tokens,
        "defense_report": ctx.defense.report(FINETUNE),
    }


def stage_post_finetune(ctx: RunContext) -> dict[str, Any]:
    """The provider's repair of the fine-tuned model (SafeLoRA, Antidote, ...), saved as the
    deployed model; the fine-tuned model is kept when no defense acts here."""
    if POST_FINETUNE not in ctx.defense.stages:
        return {"repaired": False}
    if ctx.stage_info("finetune").get("skipped"):
        return {"repaired": False, "skipped": "fine-tuning was skipped: nothing to repair"}
    model = ctx.defense.post_finetune(finetuned_model(ctx), ctx)
    if ctx.is_main:
        with atomic_dir(ctx.stage_dir("post_finetune") / "model") as tmp:
            save_trained(model, tmp)
    return {
        "repaired": True,
        "defense": ctx.defense.name,
        "defense_report": ctx.defense.report(POST_FINETUNE),
    }


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
        with atomic_dir(folder) as tmp:
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
    path = folder / "metrics.json"
    if path.exists() and not ctx.force:
        return read_json(path), True
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
        "generated_tokens": sum(len(ctx.tokenizer(c, add_special_tokens=False)["input_ids"])
                                for c in raw),
    }
    if ctx.is_main:
        with atomic_dir(folder) as tmp:
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
        source = (folder / f"attack_{name}" if repaired else tuned_source.parent / stable_hash(
            {**tuned_key, "attack": attack.serving_key(), "variant": name})[:16])
        if (source / "metrics.json").exists() and not ctx.force:
            attack_eval[name], cached = read_json(source / "metrics.json"), True
        else:
            attack_eval[name] = evaluate_attack_variant(
                ctx, load_final(), source, name, variant, served_formatter, ask)
            cached = False
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
