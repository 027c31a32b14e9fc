"""Overhead of each defense in the stage it acts in, against plain SFT, interleaved.

Same model, same data (the config's alignment data, or the user's data for fine-tuning-stage
defenses), same batch size, one process. Each defense trains side by side with an sft trainer of
its stage: after untimed warm-up steps, blocks of ``--steps`` optimizer steps alternate (sft,
defense, sft, defense, ...) ``--repeats`` times, so slow phases of a shared machine hit both
alike. The ratio of each repeat is defense seconds per step / sft seconds per step of the block
just before it; the table shows their median and min–max spread, the token work the defense
did relative to sft (the floor the ratio should approach with this data), and the measured
parts that floor does not count (``irreducible``): the LM head run at more positions than sft's
supervised ones, a loss over the whole vocabulary at those positions (KL's softmax, KL and their
gradient: the ``autograd.Function`` named in ``VOCABULARY_LOSSES``, timed forward and backward),
and the parts a defense declares from a profile (``Defense.irreducible``, e.g. RepNoise's logit
lens). ``meets_target`` in the JSON: the step is within 1.3× of the floor plus
those parts, or the defense names what it cannot avoid.

    python benchmarks/defense_overhead.py                           # quickstart config, all
    python benchmarks/defense_overhead.py --defenses kl ewc --json  # a subset, machine-readable
    python benchmarks/defense_overhead.py configs/cpu_sst2.yaml --args tar='{inner_steps: 4}'
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from hftlab.config import load_config
from hftlab.context import RunContext
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, POST_FINETUNE
from hftlab.devices import seed_everything
from hftlab.model import attach_trainable, causal_lm_parts
from hftlab.stages import Stage
from hftlab.stages.training import run_view
from hftlab.train import SFTTrainer

# forward-backward passes per optimizer step, by the algorithm (with its default options)
# ("+fwd": one extra no-grad forward of the stage-start model)
PASSES = {"sft": 1, "vaccine": 2, "t_vaccine": 2, "booster": 3, "repnoise": 2, "lisa": 1,
          "vlguard_mix": 2, "ldifs": "1+fwd", "kl": "1+fwd", "constrained_sft": "1+fwd",
          "ewc": 1, "safe_instr": 1, "backdoor_align": 1, "guardrail": 1, "panacea": 3}
# a measured part is named as irreducible when it costs at least this share of a step
NAMED_SHARE = 0.05
# the goal: each defense's step at most this multiple of its work floor plus irreducible parts
TARGET = 1.3
# per defense, its loss over the vocabulary at every KL/LM-head position (module, Function)
VOCABULARY_LOSSES = {"kl": ("hftlab.defenses.kl", "CrossEntropyAndKL")}
LOSS_WHY = ("its loss over the whole vocabulary at every position (log_softmax of both models, the "
            "KL sum and its gradient), forward and backward timed: work the method defines "
            "(reference: every position) that the token-work floor does not count")
# (Function, "forward" | "backward") -> the method before Meter.time_loss wrapped it
UNWRAPPED: dict[tuple[type, str], Callable[..., object]] = {}
HEAD_WHY = ("LM head (vocabulary projection) at more positions than sft's supervised ones: "
            "the token-work floor counts the body only; forward timed, backward taken as 2× "
            "forward for passes with gradients")


def passes(name: str, defense) -> str:
    """The algorithm's forward-backward passes per step (a label beside the work floor)."""
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
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved sft/defense blocks")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, each")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: the process's CPU seconds (robust to other jobs on a shared "
                             "CPU; one process computes at a time); default: cpu without a GPU, "
                             "else wall"),
    parser.add_argument("--args", nargs="*", default=[], metavar="NAME=YAML",
                        help="defense options, e.g. tar='{inner_steps: 4}'")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. alignment.train.batch_size=4")
    return parser.parse_args()


def acting_stage(name: str) -> str:
    stages = DEFENSES.get(name).stages
    return ALIGNMENT if ALIGNMENT in stages or not stages else FINETUNE


@dataclass
class Meter:
    """Counters one trainer's model feeds: token work (3 units per token with gradients, 1
    without, padding included; copies of the model made later share the hooks), the LM
    head's forward seconds and rows, with and without gradients, and the seconds of its
    defense's vocabulary loss (:meth:`time_loss`)."""

    work: int = 0
    head_seconds: float = 0.0  # forward, weighted 3 with gradients (forward + backward), 1 not
    head_rows: int = 0
    loss_seconds: float = 0.0
    clock: Callable[[], float] = time.perf_counter

    def time_loss(self, name: str) -> None:
        """Wrap the forward and backward of ``name``'s vocabulary loss (VOCABULARY_LOSSES) so
        that their seconds add to this meter (only this trainer's defense calls it)."""
        if name not in VOCABULARY_LOSSES:
            return
        module, attribute = VOCABULARY_LOSSES[name]
        function = getattr(importlib.import_module(module), attribute)
        for method in ("forward", "backward"):
            # always wrap the unwrapped method: a second meter replaces the first, never nests
            original = UNWRAPPED.setdefault((function, method), getattr(function, method))

            def timed(*args, _original=original):
                start = self.clock()
                try:
                    return _original(*args)
                finally:
                    self.loss_seconds += self.clock() - start

            setattr(function, method, staticmethod(timed))

    def attach(self, model: torch.nn.Module) -> None:
        # closures, not bound methods: a deep copy of the model (a frozen copy under full
        # fine-tuning) keeps feeding this meter
        _, head = causal_lm_parts(model)
        started: list[float] = []

        def count(module: torch.nn.Module, args: tuple) -> None:
            self.work += args[0].numel() * (3 if torch.is_grad_enabled() else 1)

        def head_start(module: torch.nn.Module, args: tuple) -> None:
            started.append(self.clock())

        def head_end(module: torch.nn.Module, args: tuple, output: object) -> None:
            seconds = self.clock() - started.pop()
            self.head_seconds += seconds * (3 if torch.is_grad_enabled() else 1)
            self.head_rows += args[0].shape[:-1].numel()

        model.get_input_embeddings().register_forward_pre_hook(count)
        head.register_forward_pre_hook(head_start)
        head.register_forward_hook(head_end)

    def snapshot(self) -> tuple[int, float, int, float]:
        return self.work, self.head_seconds, self.head_rows, self.loss_seconds


class SteppedTrainer:
    """A trainer run in its own thread that trains only while the main thread lets it: one
    block of ``n`` optimizer steps per :meth:`run_block`, so two trainers can be interleaved
    (only one computes at a time)."""

    def __init__(self, ctx: RunContext, name: str, stage: str, options: dict, total: int,
                 clock: str = "wall") -> None:
        defense = DEFENSES.get(name)(**options)
        section = ctx.config.alignment if stage == ALIGNMENT else ctx.config.finetune
        train_cfg = section.train
        examples = ctx.data.alignment if stage == ALIGNMENT else ctx.data.user
        self.items = ctx.tokenize(examples, train_cfg.max_length)
        seed_everything(0)
        model = attach_trainable(ctx.base_model(full_training=train_cfg.method == "full"),
                                 train_cfg)
        self.meter = Meter(clock=time.process_time if clock == "cpu" else time.perf_counter)
        self.meter.attach(model)
        self.meter.time_loss(name)
        ctx.defense = defense
        self.passes = passes(name, defense)
        self.trainer = SFTTrainer(
            model, replace(train_cfg, max_steps=total), ctx.accelerator,
            ctx.tokenizer.pad_token_id, stage, defense, seed=0, precision=ctx.precision,
            run=run_view(ctx, Stage.of_hook(stage), ctx.data.alignment,
                         ctx.data.provider_harmful))
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.left = 0
        self.stamps: list[tuple[float, float]] = []  # (wall, process CPU) after each step
        self.losses: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.go.acquire()
            self.trainer.train(self.items, on_step=self._on_step)
        except BaseException as error:  # re-raised in the main thread
            self.error = error
        self.done.release()

    def _on_step(self, trainer: SFTTrainer, loss: float) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append((time.perf_counter(), time.process_time()))
        self.losses.append(loss)
        self.left -= 1
        if self.left == 0:
            self.done.release()
            self.go.acquire()

    def run_block(self, n: int) -> dict[str, float]:
        """Train ``n`` steps; seconds, token work and LM-head seconds/rows per step."""
        work, head_s, head_rows, loss_s = self.meter.snapshot()
        self.left = n
        wall, cpu = time.perf_counter(), time.process_time()
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error
        w, hs, hr, ls = self.meter.snapshot()
        end_wall, end_cpu = self.stamps[-1]
        return {"wall": (end_wall - wall) / n, "cpu": (end_cpu - cpu) / n, "work": (w - work) / n,
                "head_seconds": (hs - head_s) / n, "head_rows": (hr - head_rows) / n,
                "loss_seconds": (ls - loss_s) / n}

    def finish(self) -> None:
        self.go.release()
        self.thread.join()


def measure(
    ctx: RunContext, name: str, base: SteppedTrainer, options: dict, args: argparse.Namespace
) -> dict:
    """Interleaved blocks of ``base`` (sft) and ``name``; the defense's row."""
    stage = base.trainer.stage
    total = args.warmup + args.repeats * args.steps
    own = SteppedTrainer(ctx, name, stage, options, total, args.clock)
    try:
        own.run_block(args.warmup) if args.warmup else None
        pairs = []
        for _ in range(args.repeats):
            pairs.append((base.run_block(args.steps), own.run_block(args.steps)))
    finally:
        own.finish()
    row = summarise(name, stage, own.passes, pairs, own.losses[-1], args.clock)
    # parts the defense itself names (found with a profiler, not timed by this benchmark)
    row["irreducible"] += [{"part": "declared", "seconds_per_step": None, "share": None,
                            "ratio_points": None, "why": why}
                           for why in DEFENSES.get(name).irreducible]
    row["meets_target"] = (row["ratio_over_floor_and_irreducible"] <= TARGET
                           or any(p["part"] == "declared" for p in row["irreducible"]))
    return row


def summarise(name: str, stage: str, passes_: str, pairs: list[tuple[dict, dict]],
              loss: float, clock: str) -> dict:
    for block in (b for pair in pairs for b in pair):
        block["seconds"] = block[clock]
    ratios = [d["seconds"] / s["seconds"] for s, d in pairs]
    wall_ratio = statistics.median(d["wall"] / s["wall"] for s, d in pairs)
    mid = statistics.median
    sft_s, own_s = mid(s["seconds"] for s, _ in pairs), mid(d["seconds"] for _, d in pairs)
    floor = mid(d["work"] / s["work"] for s, d in pairs)
    irreducible = []
    extra_head = mid(d["head_seconds"] - s["head_seconds"] for s, d in pairs)
    if extra_head / own_s >= NAMED_SHARE:
        rows = mid(d["head_rows"] / max(s["head_rows"], 1) for s, d in pairs)
        irreducible.append({"part": "lm_head", "seconds_per_step": round(extra_head, 4),
                            "share": round(extra_head / own_s, 3),
                            "ratio_points": round(extra_head / sft_s, 2),
                            "why": f"{HEAD_WHY} ({rows:.1f}× sft's head rows)"})
    # less the share sft's own cross-entropy at its supervised rows would take
    loss = mid(d["loss_seconds"] * (1 - s["head_rows"] / max(d["head_rows"], 1)) for s, d in pairs)
    if loss / own_s >= NAMED_SHARE:
        irreducible.append({"part": "vocabulary_loss", "seconds_per_step": round(loss, 4),
                            "share": round(loss / own_s, 3),
                            "ratio_points": round(loss / sft_s, 2), "why": LOSS_WHY})
    counted = floor + sum(part["ratio_points"] for part in irreducible)
    return {"defense": name, "stage": stage, "ratio": round(mid(ratios), 3),
            "spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "work_floor": round(floor, 3), "ratio_over_floor": round(mid(ratios) / floor, 3),
            "ratio_over_floor_and_irreducible": round(mid(ratios) / counted, 3),
            "irreducible": irreducible, "passes": passes_,
            "seconds_per_step": round(own_s, 4), "sft_seconds_per_step": round(sft_s, 4),
            "wall_ratio": round(wall_ratio, 3), "final_loss": round(loss, 4)}


def run_all(ctx: RunContext, names: list[str], options: dict, args: argparse.Namespace,
            log: Callable[[str], None]) -> list[dict]:
    rows = []
    for stage in (ALIGNMENT, FINETUNE):
        here = [n for n in names if acting_stage(n) == stage]
        if not here:
            continue
        total = args.warmup + args.repeats * args.steps * len(here)
        base = SteppedTrainer(ctx, "sft", stage, {}, total, args.clock)
        try:
            if args.warmup:
                base.run_block(args.warmup)
            for name in here:
                rows.append(measure(ctx, name, base, options.get(name, {}), args))
                log(format_row(rows[-1]))
        finally:
            base.finish()
    return rows


def format_row(r: dict) -> str:
    named = ", ".join(p["part"] if p["ratio_points"] is None
                      else f"{p['part']} {p['ratio_points']:.2f}"
                      for p in r["irreducible"]) or "-"
    return (f"{r['defense']:<16}{r['stage']:<11}{r['seconds_per_step']:>8.3f}"
            f"{r['ratio']:>7.2f}×  {r['spread'][0]:.2f}–{r['spread'][1]:.2f}"
            f"{r['passes']:>8}{r['work_floor']:>7.2f}×{r['ratio_over_floor']:>7.2f}  {named}")


def main() -> None:
    args = parse_args()
    options = {}
    for item in args.args:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value) or {}
    config = load_config(args.config, args.overrides)
    args.clock = args.clock or ("wall" if torch.cuda.is_available() else "cpu")
    # repairs that act only after fine-tuning have no training step to time: their cost is the
    # post_finetune stage's seconds in a run's metrics.json
    names = [n for n in (args.defenses or DEFENSES.names())
             if n != "sft" and set(DEFENSES.get(n).stages) - {POST_FINETUNE}]
    ctx = RunContext(config, Path("/tmp/hftlab-bench-defenses"))
    header = (f"config {args.config} · model {config.model.name} · precision {ctx.precision} · "
              f"{args.repeats} × {args.steps} steps interleaved with sft (+{args.warmup} warm-up)"
              f" · {args.clock} clock · threads {torch.get_num_threads()}")
    # with --json the table goes to stderr as it fills (progress), the JSON alone to stdout
    log = functools.partial(print, file=sys.stderr) if args.json else print
    log(header)
    log(f"\n{'defense':<16}{'stage':<11}{'s/step':>8}{'× sft':>8}  {'spread':<9}{'passes':>8}"
        f"{'work×':>8}{'×/work':>7}  irreducible (ratio points)")
    rows = run_all(ctx, names, options, args, log)
    if args.json:
        print(json.dumps({"config": args.config, "precision": ctx.precision,
                          "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                          "clock": args.clock,
                          "defenses": {r["defense"]: r for r in rows}}, indent=1))
        return
    print("\n× sft: median over repeats of defense / sft seconds per step of adjacent blocks; "
          "work×: token work per step (3/token with gradients, 1 without, padding included) "
          "relative to sft, the floor for × sft given this data; ×/work: × sft over that floor; "
          "irreducible: measured parts the floor does not count, in ratio points ('declared': "
          "named by the defense from a profile, see --json)")


if __name__ == "__main__":
    main()
