"""Overhead of each defense in the stage it acts in, against plain SFT, side by side.

Same model, same data (the config's alignment data, or the user's data for fine-tuning-stage
defenses), same batch size and number of optimizer steps, one process. Prints seconds per
optimizer step, the ratio to ``sft``, the number of forward-backward passes the algorithm
needs per step and the token work it actually did relative to sft (the floor the ratio should
approach with this data: extra batches of longer rows cost more than a pass of the training
batch), plus peak accelerator memory on GPUs.

    python benchmarks/defense_overhead.py                           # quickstart config
    python benchmarks/defense_overhead.py configs/cpu_sst2.yaml --steps 10
    python benchmarks/defense_overhead.py --defenses vaccine booster --args tar='{inner_steps: 4}'
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from hftlab.config import load_config
from hftlab.context import RunContext, seed_everything
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE
from hftlab.model import attach_trainable
from hftlab.stages import Stage
from hftlab.stages.training import run_view
from hftlab.train import SFTTrainer

# forward-backward passes per optimizer step, by the algorithm (with its default options)
# ("+fwd": one extra no-grad forward of the stage-start model)
PASSES = {"sft": 1, "vaccine": 2, "t_vaccine": 2, "booster": 3, "repnoise": 2, "lisa": 1,
          "vlguard_mix": 2, "ldifs": "1+fwd", "kl": "1+fwd", "constrained_sft": "1+fwd",
          "ewc": 1, "safe_instr": 1, "backdoor_align": 1, "guardrail": 1, "panacea": 3}


def passes(name: str, defense) -> str:
    """The floor for the ratio: forward-backward passes the algorithm needs per step."""
    if name == "tar":  # K attack steps, one TR pass every tr_every, retain + frozen forward
        from hftlab.defenses.tar_adversary import tamper_weights

        o = defense.options
        tr = len(tamper_weights(o.inner_steps, o.tr_every, 1.0, o.weighting, 0.0))
        return f"{o.inner_steps + tr + 1.3:.1f}"
    return str(PASSES.get(name, "?"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--defenses", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--args", nargs="*", default=[], metavar="NAME=YAML",
                        help="defense options, e.g. tar='{inner_steps: 4}'")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. alignment.train.batch_size=4")
    return parser.parse_args()


def acting_stage(name: str) -> str:
    stages = DEFENSES.get(name).stages
    return ALIGNMENT if ALIGNMENT in stages or not stages else FINETUNE


def time_defense(
    ctx: RunContext, name: str, stage: str, options: dict, steps: int, warmup: int
) -> dict:
    defense = DEFENSES.get(name)(**options)
    section = ctx.config.alignment if stage == ALIGNMENT else ctx.config.finetune
    train_cfg = section.train
    examples = ctx.data.alignment if stage == ALIGNMENT else ctx.data.user
    items = ctx.tokenize(examples, train_cfg.max_length)
    seed_everything(0)
    model = attach_trainable(ctx.base_model(full_training=train_cfg.method == "full"), train_cfg)
    ctx.defense = defense
    train = replace(train_cfg, max_steps=warmup + steps)
    trainer = SFTTrainer(model, train, ctx.accelerator, ctx.tokenizer.pad_token_id, stage,
                         defense, seed=0, precision=ctx.precision,
                         run=run_view(ctx, Stage.of_hook(stage), ctx.data.alignment,
                                      ctx.data.provider_harmful))
    stamps: list[float] = []
    work_marks: list[int] = []
    work = count_token_work(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def on_step(trainer: SFTTrainer, loss: float) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        work_marks.append(work[0])

    start = time.perf_counter()
    result = trainer.train(items, on_step=on_step)
    timed = stamps[warmup:]
    first = stamps[warmup - 1] if warmup else start
    seconds = (timed[-1] - first) / len(timed)
    work_first = work_marks[warmup - 1] if warmup else 0
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"stage": stage, "seconds_per_step": seconds, "peak_mb": peak,
            "final_loss": result.losses[-1], "passes": passes(name, defense),
            "work_per_step": (work_marks[-1] - work_first) / len(timed)}


def count_token_work(model: torch.nn.Module) -> list[int]:
    """A running count of the token work of every forward pass through ``model`` (copies made
    later share the hook): 3 units per token with gradients (forward + backward), 1 without.
    Padded tokens count, since they are computed; the ratio to sft is the data-aware floor
    (a Booster harmful batch of 10 long BeaverTails answers costs more than 8 refusals)."""
    total = [0]

    def hook(module: torch.nn.Module, args: tuple) -> None:
        total[0] += args[0].numel() * (3 if torch.is_grad_enabled() else 1)

    model.get_input_embeddings().register_forward_pre_hook(hook)
    return total


def main() -> None:
    args = parse_args()
    options = {}
    for item in args.args:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value) or {}
    config = load_config(args.config, args.overrides)
    # repairs that act only after fine-tuning have no training step to time: their cost is the
    # post_finetune stage's seconds in a run's metrics.json
    names = [n for n in (args.defenses or DEFENSES.names())
             if n != "sft" and set(DEFENSES.get(n).stages) - {POST_FINETUNE}]
    stages = sorted({acting_stage(n) for n in names} or {ALIGNMENT})
    plan = [("sft", stage) for stage in stages] + [(n, acting_stage(n)) for n in names]
    ctx = RunContext(config, Path("/tmp/hftlab-bench-defenses"))
    print(f"config {args.config} · model {config.model.name} · precision {ctx.precision} · "
          f"{args.steps} timed steps (+{args.warmup} warm-up) · batch "
          f"{config.alignment.train.batch_size} · threads {torch.get_num_threads()}")
    rows = [(name, time_defense(ctx, name, stage, options.get(name, {}), args.steps,
                                args.warmup)) for name, stage in plan]
    base = {r["stage"]: r for name, r in rows if name == "sft"}
    print(f"\n{'defense':<16}{'stage':<11}{'s/step':>8}{'× sft':>7}{'passes':>8}"
          f"{'work×':>7}{'peak MB':>9}{'loss':>8}")
    for name, r in rows:
        ratio = r["seconds_per_step"] / base[r["stage"]]["seconds_per_step"]
        work = r["work_per_step"] / base[r["stage"]]["work_per_step"]
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"{name:<16}{r['stage']:<11}{r['seconds_per_step']:>8.3f}{ratio:>6.2f}×"
              f"{r['passes']:>8}{work:>6.2f}×{peak:>9}{r['final_loss']:>8.3f}")
    print("\npasses: forward-backward passes per step by the algorithm; work×: token work per "
          "step (3/token with gradients, 1/token without, padding included) relative to sft, "
          "the floor for × sft given this data")


if __name__ == "__main__":
    main()
