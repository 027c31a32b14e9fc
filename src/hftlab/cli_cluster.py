"""Command line past one machine: ``hftlab sweep --backend ray`` (the options and the dispatch)
and ``hftlab plan`` (what a sweep costs here and on GPUs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hftlab.config import ConfigError


def add_backend_options(sweep: argparse.ArgumentParser) -> None:
    """The ``hftlab sweep`` options that pick where runs execute."""
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: this machine, --workers processes (default); ray: each run "
                       "a Ray task on a cluster that shares this filesystem")
    sweep.add_argument("--address", default=None,
                       help="with --backend ray: the cluster (auto, or HOST:PORT of `ray start "
                       "--head`); default: a Ray instance started on this machine")
    sweep.add_argument("--num-cpus", type=float, default=None,
                       help="with --backend ray: CPUs each run declares (default: the sweep "
                       "file's resources, else 1; torch uses that many threads)")
    sweep.add_argument("--num-gpus", type=float, default=None,
                       help="with --backend ray: GPUs each run declares (default 0)")
    sweep.add_argument("--memory", default=None,
                       help="with --backend ray: memory each run declares, e.g. 24GB")
    sweep.add_argument("--max-retries", type=int, default=3,
                       help="with --backend ray: retries of a run whose worker or node is lost "
                       "(each resumes from the run's checkpoint; default 3)")


def run_sweep_backend(sweep: Any, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Run ``sweep`` on the backend the options name; returns the failed runs."""
    if getattr(args, "backend", "local") != "ray":
        from hftlab.sweep import run_sweep

        return run_sweep(sweep, args.workers)
    if args.workers != 1:
        raise ConfigError("--workers is for --backend local; with --backend ray each run is a "
                          "task: size them with --num-cpus / --num-gpus")
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--backend ray needs Ray: pip install 'hftlab[cluster]'") from exc
    from hftlab.sweep_ray import RayOptions, run_sweep_ray

    options = RayOptions(args.address, args.num_cpus, args.num_gpus, args.memory,
                         args.max_retries)
    return run_sweep_ray(sweep, options)


def add_plan_parser(sub: Any) -> None:
    plan = sub.add_parser("plan", help="estimate what a sweep costs: per run and in total on "
                          "this CPU (from the committed records' timings), and in GPU-hours")
    plan.add_argument("sweep_file", type=Path)
    plan.add_argument("overrides", nargs="*", help="key=value settings for every run")
    plan.add_argument("--gpu", choices=("h100", "a100"), default=None,
                      help="also estimate the sweep on this GPU at its model's size")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs running runs side by side")
    plan.add_argument("--records", type=Path, default=None,
                      help="the folder of run records to measure speeds from (default: "
                      "results/ beside the package's repository, else ./results)")
    plan.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                      help="the records' precision to use (default: what `auto` gives here)")


def cmd_plan(args: argparse.Namespace) -> int:
    from hftlab.plan import plan_lines

    print("\n".join(plan_lines(args.sweep_file, args.overrides, gpu=args.gpu, gpus=args.gpus,
                               records=args.records, precision=args.precision)))
    return 0
