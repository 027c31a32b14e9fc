"""The finetune stage: the user's job on the aligned model, cached outside the run by
:meth:`FinetuneInputs.key`, so runs that share everything up to here (sft and a repair of it,
one repair at several strengths) train once. It trains on the rows the data stage saved
(``data/user_data.jsonl``), and its key fingerprints those same rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.cache import commit_entry, copy_tree, entry_lock, usable_entry
from hftlab.data.loaders import data_fingerprint
from hftlab.data.records import Example
from hftlab.defenses import FINETUNE
from hftlab.formatting import SYSTEM_PROMPT_KEY, Tokenized
from hftlab.mechanisms import MechanismTracker, embedding_drift, hidden_states
from hftlab.model import attach_trainable, save_trained
from hftlab.stage_models import aligned_adapter_model, aligned_model
from hftlab.stages import CHECKPOINTS, MARKER, Stage, versioned_key
from hftlab.stages.align import align_inputs
from hftlab.stages.data import user_rows
from hftlab.stages.training import run_view, train_stage
from hftlab.utils import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    from hftlab.config import MechanismConfig, TrainConfig
    from hftlab.context import RunContext

log = logging.getLogger(__name__)
KEY_VERSION = 1  # bump when what determines a fine-tuned model changes
N_TRACK_TASK = 24  # benign user rows whose loss is tracked during fine-tuning


@dataclass(frozen=True)
class FinetuneInputs:
    """Everything that determines the fine-tuning stage's output (model, curves, drift)."""

    alignment_key: str
    user: list[Example]  # the data stage's rows: what the stage trains on
    train: TrainConfig  # as the run's defense trains it
    mechanisms: MechanismConfig
    mech_alignment: list[Example]
    mech_harmful: list[Example]
    alignment: list[Example]  # fine-tuning-stage defenses may train on these (Lisa, ...)
    provider_harmful: list[Example]  # ... and on these (Panacea, ...)
    seed: int
    defense: Any  # the defense's fine-tuning cache key
    continues_alignment_adapter: bool
    precision: str | None = None  # its own compute precision; None: the alignment's

    def key(self) -> str:
        if not self.user:
            # nothing left to train on (the guardrail dropped every row): the stage serves the
            # aligned model, whatever the seed or settings, so such runs share it and its eval
            return versioned_key({"alignment": self.alignment_key, "skipped": "empty upload"},
                                 KEY_VERSION)
        fields: dict[str, Any] = {
            "alignment": self.alignment_key,
            "user": data_fingerprint(self.user),
            "train": self.train,
            "mechanisms": self.mechanisms,
            "mechanisms_data": [data_fingerprint(self.mech_alignment),
                                data_fingerprint(self.mech_harmful)],
            "alignment_data": data_fingerprint(self.alignment),
            "provider_harmful": data_fingerprint(self.provider_harmful),
            "seed": self.seed,
            "defense": self.defense,
        }
        # a row's own system prompt is trained on but not in the data fingerprint (meta)
        system_prompts = [e.meta.get(SYSTEM_PROMPT_KEY) for e in self.user]
        if any(p is not None for p in system_prompts):
            fields["system_prompts"] = system_prompts
        if self.continues_alignment_adapter:
            fields["continues_alignment_adapter"] = True
        # only when it differs from the alignment's (which the alignment key holds), so the
        # entries cached before finetune.precision existed stay valid
        if self.precision is not None:
            fields["precision"] = self.precision
        return versioned_key(fields, KEY_VERSION)


def finetune_inputs(ctx: RunContext) -> FinetuneInputs:
    data = ctx.data
    return FinetuneInputs(
        alignment_key=align_inputs(ctx).key(), user=user_rows(ctx), train=ctx.finetune_train,
        mechanisms=ctx.config.mechanisms, mech_alignment=data.mech_alignment,
        mech_harmful=data.mech_harmful, alignment=data.alignment,
        provider_harmful=data.provider_harmful, seed=ctx.config.seed,
        defense=ctx.defense.cache_key(FINETUNE),
        continues_alignment_adapter=ctx.defense.continues_alignment_adapter(),
        precision=ctx.finetune_precision if ctx.finetune_precision != ctx.precision else None,
    )


def stage_finetune(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune, or copy the cached result into the run folder (links where possible)."""
    inputs = finetune_inputs(ctx)
    key = inputs.key()
    cached = ctx.cache_dir / "finetuned" / key
    folder = ctx.stage_dir(Stage.FINETUNE)
    with entry_lock(cached, ctx.is_main):
        ctx.accelerator.wait_for_everyone()
        if not ctx.force and usable_entry(cached):
            log.info("fine-tuned model found in cache: %s", cached)
            if ctx.is_main:
                copy_tree(cached, folder, skip={"meta.json", "manifest.json", "eval"})
            ctx.accelerator.wait_for_everyone()
            return {**read_json(cached / "meta.json"), "cached": True, "cache": str(cached),
                    "key": key}
        info = train_finetune(ctx, inputs)
        if ctx.is_main:
            with commit_entry(cached) as tmp:
                copy_tree(folder, tmp, skip={MARKER, CHECKPOINTS})
                write_json(tmp / "meta.json", {k: v for k, v in info.items() if k != "tokens"})
        ctx.accelerator.wait_for_everyone()
    return {**info, "cached": False, "cache": str(cached), "key": key}


def train_finetune(ctx: RunContext, inputs: FinetuneInputs) -> dict[str, Any]:
    """A fresh LoRA (or full FT) on the aligned model, with the survey's curves every
    ``mechanisms.every`` steps and the hidden-state drift at the end."""
    mech = inputs.mechanisms
    examples = inputs.user
    folder = ctx.stage_dir(Stage.FINETUNE)
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
    train_cfg = inputs.train
    continued = inputs.continues_alignment_adapter
    precision = ctx.finetune_precision
    model = (aligned_adapter_model(ctx, precision) if continued
             else aligned_model(ctx, train_cfg.method == "full", precision))
    max_len = train_cfg.max_length
    # Drift is measured on the held-out alignment prompts as the model sees them at inference.
    drift_prompts = [ctx.formatter.encode_prompt(e.prompt)[:max_len] for e in inputs.mech_alignment]
    drift_items = [Tokenized(ids, len(ids)) for ids in drift_prompts]
    before = (
        hidden_states(model, drift_items, ctx.tokenizer.pad_token_id, mech.batch_size,
                      ctx.device, ctx.finetune_autocast)
        if mech.drift and drift_items
        else None
    )
    if not continued:
        model = attach_trainable(model, train_cfg)
    tracker = None
    if mech.every:
        # the user's own benign rows: not harmful, not added by the provider's defense
        benign = [e for e in examples
                  if not e.is_harmful and "added_by" not in e.meta][:N_TRACK_TASK]
        tracker = MechanismTracker(
            mech.every,
            ctx.tokenize(benign, max_len),
            ctx.tokenize(inputs.mech_alignment, max_len),
            ctx.tokenize(inputs.mech_harmful, max_len),
            mech.batch_size,
        )
    view = run_view(ctx, Stage.FINETUNE, inputs.alignment, inputs.provider_harmful)
    trainer, result = train_stage(ctx, model, examples, Stage.FINETUNE, inputs.seed, view,
                                  tracker)
    drift = None
    if before is not None:
        after = hidden_states(trainer.model, drift_items, ctx.tokenizer.pad_token_id,
                              mech.batch_size, ctx.device, ctx.finetune_autocast)
        drift = embedding_drift(before, after)
    if ctx.is_main:
        with atomic_dir(folder / "model") as tmp:
            save_trained(trainer.model, tmp)
        write_json(folder / "curves.json", tracker.curves if tracker else [])
        write_json(folder / "drift.json", drift)
    return {
        "steps": result.steps,
        "precision": precision,
        "train_seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "final_loss": result.losses[-1],
        "resumed_from_step": trainer.resumed_from,  # 0: trained in one go
        "tokens": result.tokens,
        # the saved adapter is the alignment LoRA trained on: it applies to the base model
        **({"continues_alignment_adapter": True} if continued else {}),
        "defense_report": ctx.defense.report(FINETUNE),
    }
