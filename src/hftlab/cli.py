"""Command line: ``hftlab run``, ``report``, ``list``, ``sweep``, ``compare``, ``export``,
``judge``, ``data``, ``docs``."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from hftlab.cli_tools import add_data_parser, add_judge_parser, cmd_data, cmd_judge
from hftlab.config import ConfigError, load_config
from hftlab.data.records import DataError


class UsageError(Exception):
    """A command line that argparse rejects: raised instead of argparse's usage text and exit,
    so that :func:`main` prints it as one line and returns 2 like every other error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hftlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the whole pipeline for one config")
    run.add_argument("config", type=Path, help="YAML config file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.n=200")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    run.add_argument("--force", action="store_true", help="redo every stage, ignore caches")
    run.add_argument("-v", "--verbose", action="store_true")
    report = sub.add_parser(
        "report", help="summarise a finished run, a sweep or any folder of runs: prints the "
        "summary, writes report.md and report.html (plots; needs hftlab[report])")
    report.add_argument("run_dir", type=Path, help="a run folder, a sweep folder or any folder "
                        "with finished runs below it")
    sub.add_parser("list", help="defenses, attacks, judges and tasks")
    sweep = sub.add_parser("sweep", help="run (or resume) a grid of runs from a sweep file")
    sweep.add_argument("sweep_file", type=Path)
    sweep.add_argument("--workers", type=int, default=1,
                       help="parallel worker processes (the CPU threads are split among them)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the planned runs, how far each got and which alignments "
                       "are still to train; run nothing")
    sweep.add_argument("--only", nargs="*", default=None, metavar="PATTERN",
                       help="run only the runs whose name matches one of these globs")
    sweep.add_argument("-v", "--verbose", action="store_true")
    compare = sub.add_parser(
        "compare", help="mean ± std over seeds per cell and each defense's difference to sft")
    compare.add_argument("folder", type=Path, help="a sweep folder or any folder of runs")
    compare.add_argument("--baseline", default=None,
                         help="the defense to compare against, or KEY=VALUE for any setting "
                              "that varies (e.g. poison_ratio=0.0); default: sft when the "
                              "defense varies, else the lowest poison ratio when that varies")
    compare.add_argument("--metrics", nargs="*", default=None,
                         help="metrics.json keys or dotted paths into its blocks (default: "
                              "harmful_score finetune_accuracy, plus each attack eval variant's "
                              "harmful score)")
    export = sub.add_parser(
        "export", help="copy the finished runs' records (metrics.json, config.yaml; no "
        "checkpoints, no completions) into a folder small enough to commit")
    export.add_argument("folder", type=Path, help="a run folder, a sweep folder or any folder "
                        "with finished runs below it")
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    add_judge_parser(sub)
    add_data_parser(sub)
    docs = sub.add_parser("docs", help="write docs/defenses.md: each defense's reference "
                          "settings beside hftlab's default and CPU preset")
    docs.add_argument("--out", type=Path, default=Path("docs/defenses.md"),
                      help="the markdown file (default: docs/defenses.md)")
    docs.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 when the file differs from what would be written")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        take_late_overrides(parser, args, extras)
    except UsageError as exc:
        print(f"hftlab: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            from hftlab.report import write_report

            print(write_report(args.run_dir))
            print(f"\nwrote {args.run_dir / 'report.md'} and {args.run_dir / 'report.html'}")
            return 0
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export":
            from hftlab.compare import export_records

            written = export_records(args.folder, args.out)
            print(f"exported {len(written)} run record(s) to {args.out}; "
                  f"`hftlab compare {args.out}` reprints their table")
            return 0
        if args.command == "judge":
            return cmd_judge(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "docs":
            return cmd_docs(args)
        return cmd_list()
    except (ConfigError, DataError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        # one line, whatever a library put in the message
        print(f"hftlab: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


def take_late_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        extras: list[str]) -> None:
    """argparse fills the ``overrides`` positional only up to the first option, so in
    ``run CFG --out X seed=2`` the ``seed=2`` is left over: such key=value words become
    overrides, in order. Any other leftover is a UsageError with a did-you-mean."""
    if not extras:
        return
    if args.command == "run":
        settings = [w for w in extras if "=" in w and not w.startswith("-")]
        if len(settings) == len(extras):
            args.overrides.extend(settings)
            return
        extras = [w for w in extras if w not in settings]
    options = command_options(parser, args.command)
    hint = ""
    first = next((w for w in extras if w.startswith("-")), None)
    if first is not None:
        name, _, value = first.partition("=")
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
        if close:
            hint = f" (did you mean {close[0]}?)"
        elif args.command == "run":
            setting = f"{name.lstrip('-').replace('-', '_')}={value or '...'}"
            hint = f" (settings are key=value words without dashes, e.g. {setting})"
    elif args.command == "run":
        hint = " (overrides look like key=value, e.g. seed=2)"
    raise UsageError(f"unrecognized arguments: {' '.join(extras)}{hint}; see "
                     f"`hftlab {args.command} --help`")


def command_options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The option strings of subcommand ``command`` and of its own subcommands."""
    found: list[str] = []
    pending = [
        sub.choices[command] for sub in parser._actions
        if isinstance(sub, argparse._SubParsersAction) and command in sub.choices
    ]
    while pending:
        current = pending.pop()
        for action in current._actions:
            found.extend(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return sorted(set(found))


def check_out_dir(path: Path, option: str = "--out") -> None:
    """One ConfigError when no run folder can be made or written at ``path``: checked before
    the run starts, so that it cannot fail (or leave half a folder) at its first write."""
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder; choose a folder path "
                              "(hftlab makes it if missing)")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{option} {path} cannot be made: {existing} is a file, not a "
                              "folder; choose another path")
        writable = os.access(existing, os.W_OK | os.X_OK)
    except OSError as exc:
        raise ConfigError(f"{option} {path} cannot be checked ({exc}); choose a folder you can "
                          "write to") from exc
    if not writable:
        what = ("is not writable" if existing == path
                else f"cannot be made: {existing} is not writable")
        raise ConfigError(f"{option} {path} {what}; choose a folder you can write to")


def cmd_run(args: argparse.Namespace) -> int:
    from hftlab.experiment import build_experiment
    from hftlab.pipeline import run_pipeline
    from hftlab.report import write_report

    config = load_config(args.config, args.overrides)
    experiment = build_experiment(config, str(args.config))  # every check, before any file
    run_dir = args.out or Path(config.out_dir or Path("runs") / args.config.stem)
    check_out_dir(run_dir, "--out" if args.out else "out_dir" if config.out_dir else "run folder")
    run_pipeline(config, run_dir, force=args.force, experiment=experiment)
    print(write_report(run_dir))
    print(f"\nrun folder: {run_dir} (metrics.json, report.md, report.html, eval/completions.jsonl)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hftlab.compare import compare_table
    from hftlab.sweep import describe_plan, load_sweep, run_sweep

    sweep = load_sweep(args.sweep_file, args.only)
    if args.dry_run:
        print("\n".join(describe_plan(sweep)))
        return 0
    check_out_dir(sweep.out, f"{args.sweep_file}: out")
    failures = run_sweep(sweep, args.workers)
    runs_dir = sweep.out / "runs"
    if any(runs_dir.rglob("metrics.json")):
        from hftlab.report import write_report

        table = compare_table(runs_dir)
        (sweep.out / "summary.md").write_text(table + "\n")
        print(table)
        write_report(sweep.out)
    for name, error in failures:
        print(f"hftlab: run {name} failed: {error}", file=sys.stderr)
    print(f"\nsweep folder: {sweep.out} (runs/, sweep.json, summary.md, report.html)")
    return 1 if failures else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hftlab.compare import compare_table

    metrics = tuple(args.metrics) if args.metrics else None
    print(compare_table(args.folder, args.baseline, metrics))
    return 0


def option_defaults(cls: type) -> str:
    """``name=default`` for each option of a plug-in (what ``*_args`` accepts)."""
    import dataclasses

    options = getattr(cls, "Options", None)
    if options is None:
        return ""
    parts = []
    for f in dataclasses.fields(options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parts.append(f"{f.name}={default}")
    return ", ".join(parts)


def cmd_docs(args: argparse.Namespace) -> int:
    from hftlab.defense_settings import docs_drift, render_docs

    if args.check:
        problem = docs_drift(args.out)
        if problem:
            print(f"hftlab: {problem}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_docs())
    print(f"wrote {args.out}")
    return 0


def cmd_list() -> int:
    from hftlab.attacks import ATTACKS
    from hftlab.defense_settings import setting_rows, text_lines
    from hftlab.defenses import DEFENSES
    from hftlab.judges import JUDGES
    from hftlab.tasks import TASKS

    for title, registry in (("defenses", DEFENSES), ("attacks", ATTACKS), ("judges", JUDGES)):
        print(f"{title}:")
        for name in registry.names():
            cls = registry.get(name)
            print(f"  {name:<14} {cls.doc_line()}")
            if cls.paper:
                print(f"  {'':<14} paper: {cls.paper}")
            if cls.reference:
                print(f"  {'':<14} reference: {cls.reference}")
            defaults = option_defaults(cls)
            if defaults:
                print(f"  {'':<14} options: {defaults}")
            rows = setting_rows(cls) if registry is DEFENSES else []
            if rows:
                print(f"  {'':<14} settings (reference / default / CPU preset; ≠ differs):")
                for line in text_lines(rows):
                    print(f"  {'':<14}   {line}")
    print("tasks:")
    for name, task in TASKS.items():
        print(f"  {name:<14} {task.instruction.strip().splitlines()[0]}")
    return 0
