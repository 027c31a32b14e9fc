"""The fine-tuning-as-a-service pipeline, stage by stage, talking through files on disk.

    data → align → finetune → post_finetune → eval → metrics.json

Each stage writes its artifacts into its own folder of the run directory and a ``stage.json``
marker last; a rerun skips stages whose marker exists, so an interrupted run resumes where it
stopped (``force=True`` redoes everything). Aligned checkpoints and the base model's evaluation
are cached outside the run, keyed by a hash of everything that determines them.
"""

from __future__ import annotations

import logging
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hftlab import __version__
from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.config import Config, ConfigError, dump_config
from hftlab.data.loaders import data_fingerprint, load_examples
from hftlab.data.records import DataError, Example, normalize_prompt
from hftlab.data.spec import DataSpec
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE, Defense
from hftlab.evaluate import finetune_accuracy, generate, harmful_score
from hftlab.formatting import PromptFormatter, Tokenized
from hftlab.judges import JUDGES
from hftlab.mechanisms import MechanismTracker, embedding_drift, hidden_states
from hftlab.model import (
    attach_trainable,
    load_model,
    load_tokenizer,
    load_trained,
    resolve_model_path,
    save_trained,
)
from hftlab.tasks import TASKS
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
MARKER = "stage.json"
N_TRACK_TASK = 24  # benign user rows whose loss is tracked during fine-tuning


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively, else fp32."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` when ``precision`` is bf16; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """Every data set a run reads, loaded once and split into its roles."""

    alignment: list[Example]
    user: list[Example]
    mech_alignment: list[Example]
    mech_harmful: list[Example]
    eval_harmful: list[Example]
    eval_task: list[Example]
    provider_harmful: list[Example]
    overlaps: dict[str, int] = field(default_factory=dict)


class RunContext:
    """Everything the stages share: config, folders, tokenizer, plug-ins, devices."""

    def __init__(self, config: Config, run_dir: Path, force: bool = False) -> None:
        from accelerate import Accelerator

        self.config = config
        self.run_dir = run_dir
        self.force = force
        self.cache_dir = config.resolved_cache_dir()
        self.data_root = config.resolved_data_root()
        # Mixed precision is our own autocast (see SFTTrainer.autocast), so one process can run
        # configs of different precisions; accelerate supplies devices and data parallelism.
        self.accelerator = Accelerator(mixed_precision="no")
        self.device = self.accelerator.device
        self.precision = resolve_precision(config.model.precision, self.device)
        self.defense: Defense = DEFENSES.get(config.defense)(**config.defense_args)
        self.attack = ATTACKS.get(config.attack)(**config.attack_args)
        self.judge = JUDGES.get(config.eval.judge)(**config.eval.judge_args)
        self.task = TASKS[config.finetune.task]
        self.model_path = resolve_model_path(config.model.name, self.cache_dir)
        self.tokenizer = load_tokenizer(self.model_path, config.model)
        self.formatter = PromptFormatter(self.tokenizer, config.model)
        self._data: RunData | None = None

    # ----------------------------------------------------------------------------- helpers

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> Any:
        return autocast_context(self.device, self.precision)

    def load(self, spec: DataSpec) -> list[Example]:
        return load_examples(spec, self.data_root)

    def tokenize(self, examples: list[Example], max_length: int) -> list[Tokenized]:
        items = [self.formatter.encode(e, max_length) for e in examples]
        return [item for item in items if item.n_supervised > 0]

    def base_model(self, full_training: bool = False) -> torch.nn.Module:
        return load_model(
            self.model_path, self.config.model, self.device, self.precision, full_training
        )

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def stage_info(self, stage: str) -> dict[str, Any]:
        return read_json(self.stage_dir(stage) / MARKER)

    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = load_run_data(self)
        return self._data

    def model_key(self) -> dict[str, Any]:
        cfg = self.config.model
        return {
            "model": self.model_path,
            "revision": cfg.revision,
            "dtype": cfg.dtype,
            "attn_implementation": cfg.attn_implementation,
            "prompt_format": cfg.prompt_format,
            "system_prompt": cfg.system_prompt,
        }

    def alignment_key(self) -> str:
        cfg = self.config
        return stable_hash(
            {
                **self.model_key(),
                "enabled": cfg.alignment.enabled,
                "data": data_fingerprint(self.data.alignment),
                "train": cfg.alignment.train,
                "precision": self.precision,
                "seed": self.alignment_seed,
                "defense": self.defense.cache_key(ALIGNMENT),
                "provider_harmful": data_fingerprint(self.data.provider_harmful)
                if self.defense.cache_key(ALIGNMENT)
                else None,
            }
        )[:16]

    @property
    def alignment_seed(self) -> int:
        seed = self.config.alignment.seed
        return self.config.seed if seed is None else seed

    def eval_key(self) -> str:
        ev = self.config.eval
        return stable_hash(
            {
                "harmful": data_fingerprint(self.data.eval_harmful),
                "task": data_fingerprint(self.data.eval_task),
                "task_name": self.task.name,
                "judge": self.judge.describe(),
                "max_new_tokens": ev.max_new_tokens,
                "task_max_new_tokens": ev.task_max_new_tokens,
                "precision": self.precision,
            }
        )[:16]


# -------------------------------------------------------------------------------- the data


def load_run_data(ctx: RunContext) -> RunData:
    cfg = ctx.config
    ft = cfg.finetune
    task_rows = [ctx.task.format(e) for e in ctx.load(ft.task_data)]
    harmful_rows = ctx.load(ft.harmful_data)
    user = ctx.attack.build(AttackInputs(task_rows, harmful_rows, ft.n, ft.poison_ratio, cfg.seed))
    mech = cfg.mechanisms
    data = RunData(
        alignment=ctx.load(cfg.alignment.data) if cfg.alignment.enabled else [],
        user=ctx.defense.prepare_data(FINETUNE, user, ctx),
        mech_alignment=ctx.load(mech.alignment_data) if mech.every or mech.drift else [],
        mech_harmful=ctx.load(mech.harmful_data) if mech.every else [],
        eval_harmful=ctx.load(cfg.eval.harmful),
        eval_task=[ctx.task.format(e) for e in ctx.load(cfg.eval.task)],
        provider_harmful=ctx.load(cfg.provider_harmful) if cfg.provider_harmful else [],
    )
    data.alignment = ctx.defense.prepare_data(ALIGNMENT, data.alignment, ctx)
    data.overlaps = check_disjoint(data, [e for e in user if e.is_harmful])
    return data


def check_disjoint(data: RunData, user_harmful: list[Example]) -> dict[str, int]:
    """Fail when the provider's training data and the user's harmful rows share a prompt, or a
    held-out set leaks into training; count (and report) eval prompts seen in training."""
    must_differ = [
        ("finetune.harmful_data (user)", user_harmful, "alignment.data", data.alignment),
        ("finetune.harmful_data (user)", user_harmful, "provider_harmful", data.provider_harmful),
        ("finetune.harmful_data (user)", user_harmful, "mechanisms.harmful_data",
         data.mech_harmful),
        ("alignment.data", data.alignment, "mechanisms.alignment_data", data.mech_alignment),
    ]
    for name_a, rows_a, name_b, rows_b in must_differ:
        seen = {normalize_prompt(e.prompt): e for e in rows_b}
        for example in rows_a:
            other = seen.get(normalize_prompt(example.prompt))
            if other is not None:
                raise DataError(
                    f"{name_a} row {example.row} ({example.source}) has the same prompt as "
                    f"{name_b} row {other.row} ({other.source}); these roles must come from "
                    "disjoint rows: give them different files or disjoint offset/n slices"
                )
    train_prompts = {normalize_prompt(e.prompt) for e in user_harmful + data.alignment}
    leaked = sum(normalize_prompt(e.prompt) in train_prompts for e in data.eval_harmful)
    if leaked:
        log.warning("%d harmful eval prompts also occur in training data (reported)", leaked)
    return {"eval_harmful_prompts_seen_in_training": leaked}


# ------------------------------------------------------------------------------ the stages


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
    metrics = collect_metrics(ctx)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def guard_run_dir(config: Config, run_dir: Path, force: bool) -> None:
    """A run folder holds one config: resuming with another is an error, unless forced."""
    path = run_dir / "config.yaml"
    text = dump_config(config)
    if path.exists() and not force and path.read_text() != text:
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
    start = time.perf_counter()
    info = fn(ctx)
    seconds = time.perf_counter() - start
    tokens = int(info.pop("tokens", 0))
    info["timing"] = {
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if ctx.is_main:
        write_json(marker, info)  # written last: its presence means the stage is complete
    ctx.accelerator.wait_for_everyone()
    return info


def stage_data(ctx: RunContext) -> dict[str, Any]:
    """Build and save the user's fine-tuning data (``is_harmful`` per row) and the split counts."""
    data = ctx.data
    folder = ctx.stage_dir("data")
    write_jsonl(folder / "user_data.jsonl", [e.to_dict() for e in data.user])
    summary = {
        "attack": ctx.attack.describe(data.user),
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
        "defense": ctx.defense.cache_key(ALIGNMENT),
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
    """Aligned model plus the user's fine-tuning (still PEFT-wrapped for LoRA, unmerged)."""
    model = aligned_model(ctx)
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
    """The user's job: a fresh LoRA (or full FT) on the aligned model, with the survey's curves
    every ``mechanisms.every`` steps and the hidden-state drift at the end."""
    cfg = ctx.config
    mech = cfg.mechanisms
    examples = user_data(ctx)
    model = aligned_model(ctx, full_training=cfg.finetune.train.method == "full")
    max_len = cfg.finetune.train.max_length
    drift_items = [
        ctx.formatter.encode(Example(prompt=e.prompt), max_len)
        for e in ctx.data.mech_alignment
    ]
    before = (
        hidden_states(model, drift_items, ctx.tokenizer.pad_token_id, mech.batch_size,
                      ctx.device, ctx.autocast)
        if mech.drift and drift_items
        else None
    )
    model = attach_trainable(model, cfg.finetune.train)
    tracker = None
    if mech.every:
        benign = [e for e in examples if not e.is_harmful][:N_TRACK_TASK]
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
    folder = ctx.stage_dir("finetune")
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
        "tokens": result.tokens,
    }


def stage_post_finetune(ctx: RunContext) -> dict[str, Any]:
    """Hook point for post-fine-tuning repairs; the fine-tuned model is kept when none acts."""
    if POST_FINETUNE not in ctx.defense.stages:
        return {"repaired": False}
    model = ctx.defense.post_finetune(finetuned_model(ctx), ctx)
    if ctx.is_main:
        with atomic_dir(ctx.stage_dir("post_finetune") / "model") as tmp:
            save_trained(model, tmp)
    return {"repaired": True, "defense": ctx.defense.name}


def evaluate_model(
    ctx: RunContext, model: torch.nn.Module, folder: Path, label: str
) -> dict[str, Any]:
    """Harmful score and fine-tune accuracy of one model; completions saved to a file (never
    printed: they answer harmful prompts)."""
    from tqdm.auto import tqdm

    ev = ctx.config.eval
    data = ctx.data
    harmful_prompts = [e.prompt for e in data.eval_harmful]
    task_prompts = [e.prompt for e in data.eval_task]
    total = len(harmful_prompts) + len(task_prompts)
    with tqdm(total=total, desc=f"eval {label}", disable=not ctx.is_main) as bar:
        harmful_out = generate(model, ctx.formatter, harmful_prompts, ev.max_new_tokens,
                               ev.batch_size, ctx.device, ctx.autocast, bar)
        task_out = generate(model, ctx.formatter, task_prompts,
                            ev.task_max_new_tokens or ev.max_new_tokens, ev.batch_size,
                            ctx.device, ctx.autocast, bar)
    hs, flags = harmful_score(ctx.judge, harmful_prompts, harmful_out)
    fa, correct = finetune_accuracy(ctx.task, data.eval_task, task_out)
    rows = [
        {"set": "harmful", "row": e.row, "prompt": e.prompt, "completion": c, "flagged": f}
        for e, c, f in zip(data.eval_harmful, harmful_out, flags)
    ] + [
        {"set": ctx.task.name, "row": e.row, "prompt": e.prompt, "completion": c,
         "label": e.label, "correct": ok}
        for e, c, ok in zip(data.eval_task, task_out, correct)
    ]
    generated = sum(len(ctx.tokenizer(c, add_special_tokens=False)["input_ids"])
                    for c in harmful_out + task_out)
    metrics = {
        "harmful_score": round(hs, 2),
        "finetune_accuracy": round(fa, 2),
        "n_eval_harmful": len(harmful_prompts),
        "n_eval_task": len(task_prompts),
        "generated_tokens": generated,
    }
    if ctx.is_main:
        with atomic_dir(folder) as tmp:
            write_jsonl(tmp / "completions.jsonl", rows)
            write_json(tmp / "metrics.json", metrics)
    return metrics


def cached_eval(
    ctx: RunContext, folder: Path, label: str, make_model: Callable[[], torch.nn.Module]
) -> tuple[dict[str, Any], bool]:
    """(metrics, whether they came from the cache) for the model that ``make_model`` loads."""
    path = folder / "metrics.json"
    if path.exists() and not ctx.force:
        return read_json(path), True
    return evaluate_model(ctx, make_model(), folder, label), False


def stage_eval(ctx: RunContext) -> dict[str, Any]:
    """Evaluate the deployed model, the aligned model (cached with the alignment) and the
    original model (cached once per model and eval set); copy every model's completions into
    the run folder."""
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
    results["final"] = evaluate_model(ctx, deployed_model(ctx), folder / "final", "final")
    generated += results["final"]["generated_tokens"]
    shutil.copyfile(folder / "final" / "completions.jsonl", folder / "completions.jsonl")
    return {"results": results, "eval_key": ev_key, "tokens": generated}


# ----------------------------------------------------------------------------- the metrics


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


def collect_metrics(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    ev = ctx.stage_info("eval")["results"]
    data_info = ctx.stage_info("data")
    ft_dir = ctx.stage_dir("finetune")
    stages = {name: ctx.stage_info(name)["timing"] for name in STAGES}
    align = ctx.stage_info("align")
    if align.get("train_seconds"):
        stages["align"]["train_seconds"] = align["train_seconds"]
        stages["align"]["train_tokens"] = align.get("train_tokens")
        stages["align"]["seconds_per_step"] = align.get("seconds_per_step")
        stages["align"]["cached"] = align.get("cached", False)
    finetune = ctx.stage_info("finetune")
    stages["finetune"]["seconds_per_step"] = finetune["seconds_per_step"]
    stages["finetune"]["train_seconds"] = finetune["train_seconds"]
    return {
        "harmful_score": ev["final"]["harmful_score"],
        "finetune_accuracy": ev["final"]["finetune_accuracy"],
        "aligned.harmful_score": ev["aligned"]["harmful_score"],
        "aligned.finetune_accuracy": ev["aligned"]["finetune_accuracy"],
        "base.harmful_score": ev["base"]["harmful_score"] if "base" in ev else None,
        "base.finetune_accuracy": ev["base"]["finetune_accuracy"] if "base" in ev else None,
        "judge": ctx.judge.describe(),
        "task": ctx.task.name,
        "n_eval_harmful": ev["final"]["n_eval_harmful"],
        "n_eval_task": ev["final"]["n_eval_task"],
        "defense": cfg.defense,
        "attack": data_info["attack"],
        "data_counts": data_info["counts"],
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
