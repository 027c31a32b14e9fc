"""The eval stage: the deployed model, the fine-tuned model before a repair (cached with the
fine-tuning), the aligned model (cached with the alignment) and the original model (cached once
per model and eval set) generate on the eval prompts; every model's completions are copied into
the run folder. :meth:`EvalInputs.key` keys the eval sets and settings; :func:`served_key` and
:func:`variant_key` the deployed model's evaluations, served the attacker's way."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import hftlab.evaluate as evaluation
from hftlab import eval_stage
from hftlab.attacks.base import PROMPT_PROBE, EvalVariant
from hftlab.cache import entry_lock, usable_entry
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.model import merged
from hftlab.stage_models import aligned_model, deployed_model, finetuned_model
from hftlab.stages import Stage, versioned_key
from hftlab.utils import read_json, stable_hash

if TYPE_CHECKING:
    from hftlab.context import RunContext

KEY_VERSION = 1  # bump when what determines a model's evaluation changes


@dataclass(frozen=True)
class EvalInputs:
    """Everything besides the model that determines one model's evaluation."""

    harmful: list[Example]
    task: list[Example]
    task_name: str
    judge: Any  # the judge's description
    max_new_tokens: int
    task_max_new_tokens: int | None
    precision: str
    hs_plus: bool
    harmless: list[Example]
    generations: list[Example]
    generation_max_new_tokens: int | None

    def key(self) -> str:
        fields: dict[str, Any] = {
            "harmful": data_fingerprint(self.harmful),
            "task": data_fingerprint(self.task),
            "task_name": self.task_name,
            "judge": self.judge,
            "max_new_tokens": self.max_new_tokens,
            "task_max_new_tokens": self.task_max_new_tokens,
            "precision": self.precision,
        }
        # optional settings enter the key only when set, so older cached evaluations stay valid
        if self.hs_plus:
            fields["hs_plus"] = True
        if evaluation.EVALUATION_VERSION:
            fields["evaluation_version"] = evaluation.EVALUATION_VERSION
        if self.harmless:
            fields["harmless"] = data_fingerprint(self.harmless)
        if self.generations:
            fields["generations"] = data_fingerprint(self.generations)
            fields["generation_max_new_tokens"] = self.generation_max_new_tokens
        return versioned_key(fields, KEY_VERSION)


def eval_inputs(ctx: RunContext) -> EvalInputs:
    ev, data = ctx.config.eval, ctx.data
    return EvalInputs(
        harmful=data.eval_harmful, task=data.eval_task, task_name=ctx.task.name,
        judge=ctx.judge.describe(), max_new_tokens=ev.max_new_tokens,
        task_max_new_tokens=ev.task_max_new_tokens, precision=ctx.precision,
        hs_plus=bool(ev.hs_plus), harmless=data.eval_harmless,
        generations=data.eval_generations,
        generation_max_new_tokens=ev.generation_max_new_tokens,
    )


def base_key(model: dict[str, Any]) -> str:
    """The folder (under ``base_eval``) of the original model's evaluations."""
    return versioned_key(model, KEY_VERSION)


def served_fields(eval_key: str, system_prompt: str | None,
                  attack_prompt: Any | None) -> dict[str, Any]:
    """What keys the deployed model's evaluation besides its model: the eval key, the served
    system prompt and the attack's phrasing (only when it rewrites prompts, so that earlier
    cached evaluations stay valid)."""
    fields: dict[str, Any] = {"eval": eval_key, "system_prompt": system_prompt}
    if attack_prompt is not None:
        fields["attack_prompt"] = attack_prompt
    return fields


def served_key(eval_key: str, system_prompt: str | None, attack_prompt: Any | None) -> str:
    """The fine-tuned model's evaluation folder (under its fine-tuning cache entry's ``eval``)."""
    return versioned_key(served_fields(eval_key, system_prompt, attack_prompt), KEY_VERSION)


def variant_key(served: dict[str, Any], attack: Any, name: str, variant: EvalVariant) -> str:
    """One of the attack's eval variants of the deployed model (next to its evaluation)."""
    fields = {**served, "attack": attack, "variant": name}
    if variant.version:
        fields["version"] = variant.version
    return versioned_key(fields, KEY_VERSION)


def publish(ctx: RunContext, source: Path, target: Path) -> None:
    """Copy an evaluation's file into the run folder (the main process writes)."""
    if ctx.is_main:
        shutil.copyfile(source, target)


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    """Evaluate every model of the run, each from its cache where it has one."""
    cached_eval = eval_stage.cached_eval
    ev_key = eval_inputs(ctx).key()
    folder = ctx.stage_dir(Stage.EVAL)
    align_cache = ctx.stage_info(Stage.ALIGN).get("cache")
    plan: dict[str, tuple[Path, Callable[[], torch.nn.Module]]] = {}
    if ctx.config.eval.eval_base or not align_cache:
        plan["base"] = (ctx.cache_dir / "base_eval" / base_key(ctx.model_key()) / ev_key,
                        ctx.base_model)
    if align_cache:
        plan["aligned"] = (Path(align_cache) / "eval" / ev_key, lambda: aligned_model(ctx))
    results: dict[str, Any] = {}
    generated = 0
    for name, (source, load) in plan.items():
        results[name], from_cache = cached_eval(ctx, source, name, load)
        generated += 0 if from_cache else results[name]["generated_tokens"]
        results[name]["cached"] = from_cache
        publish(ctx, source / "completions.jsonl", folder / f"completions_{name}.jsonl")
    if not align_cache:
        results["aligned"] = results["base"]  # alignment disabled: the aligned model is the base
    # Only the user's model is queried the attacker's way (the attack's system prompt and prompt
    # phrasing, e.g. identity_shift's AOA persona) with the defense's system prompt on top (e.g.
    # BackdoorAlign's secret trigger); the cached base/aligned evaluations above keep the run's
    # default. (eval_inputs() above has loaded the data, so data-stage state exists.)
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
    attack_prompt = attack.serving_key() if ask is not None else None
    tuned_key = served_fields(ev_key, served, attack_prompt)
    tuned_source = (Path(ctx.stage_info(Stage.FINETUNE)["cache"]) / "eval"
                    / served_key(ev_key, served, attack_prompt))
    repaired = bool(ctx.stage_info(Stage.REPAIR).get("repaired"))
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
        publish(ctx, tuned_source / "completions.jsonl",
                        folder / "completions_finetuned.jsonl")
        extra = {"prompt": ask} if ask is not None else {}
        results["final"] = eval_stage.evaluate_model(ctx, load_final(), folder / "final", "final",
                                          served_formatter, **extra)
        final_source, from_cache = folder / "final", False
    else:
        results["final"], from_cache = cached_eval(
            ctx, tuned_source, "final", load_final, served_formatter, ask)
        final_source = tuned_source
    results["final"]["cached"] = from_cache
    generated += 0 if from_cache else results["final"]["generated_tokens"]
    publish(ctx, final_source / "completions.jsonl", folder / "completions.jsonl")
    alpaca = eval_stage.ALPACA_EVAL_FILE
    if (final_source / alpaca).exists():
        publish(ctx, final_source / alpaca, folder / alpaca)
    # The attack's extra harmful-score evaluations of the deployed model (e.g. with the backdoor
    # trigger), cached next to the final evaluation unless a repair made the final model here.
    attack_eval: dict[str, Any] = {}
    for name, variant in attack.eval_variants().items():
        source = (folder / f"attack_{name}" if repaired else tuned_source.parent
                  / variant_key(tuned_key, attack.serving_key(), name, variant))
        with entry_lock(source, ctx.is_main):
            ctx.accelerator.wait_for_everyone()
            cached = not ctx.force and usable_entry(source, marker="metrics.json")
            attack_eval[name] = (
                read_json(source / "metrics.json") if cached
                else eval_stage.evaluate_attack_variant(
                    ctx, load_final(), source, name, variant, served_formatter, ask))
        attack_eval[name]["cached"] = cached
        generated += 0 if cached else attack_eval[name]["generated_tokens"]
        publish(ctx, source / "completions.jsonl", folder / f"completions_attack_{name}.jsonl")
    serving = {
        # a digest, not the text: a defense's served prompt may hold a secret trigger
        "system_prompt_sha256": stable_hash(served)[:16] if served is not None else None,
        "attack_prompt": attack.served_prompt("{prompt}") if ask is not None else None,
    }
    return {"results": results, "eval_key": ev_key, "tokens": generated,
            "attack_eval": attack_eval or None, "serving": serving}
