"""Command line: ``hftlab run``, ``report``, ``list``, ``sweep``, ``compare``, ``export``,
``judge``, ``data``, ``plan``, ``serve``, ``docs``."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from hftlab import __version__
from hftlab.cli_cluster import add_backend_options, add_plan_parser, cmd_plan, run_sweep_backend
from hftlab.cli_tools import add_data_parser, add_judge_parser, cmd_data, cmd_judge
from hftlab.config import ConfigError, load_config
from hftlab.data.records import DataError
from hftlab.serve.cli import add_serve_parser, cmd_serve


class UsageError(Exception):
    """A command line that argparse rejects: raised instead of argparse's usage text and exit,
    so that :func:`main` prints it as one line and returns 2 like every other error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hftlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the whole pipeline for one config")
    run.add_argument("config", type=Path, help="YAML config file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.n=200")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    run.add_argument("--force", action="store_true", help="redo every stage, ignore caches")
    add_data_root(run)
    run.add_argument("-v", "--verbose", action="store_true")
    report = sub.add_parser(
        "report", help="summarise a finished run, a sweep or any folder of runs: prints the "
        "summary, writes report.md and report.html (plots; needs hftlab[report])")
    report.add_argument("run_dir", type=Path, help="a run folder, a sweep folder or any folder "
                        "with finished runs below it")
    report.add_argument("--out", type=Path, default=None,
                        help="the folder to write report.md and report.html into (default: "
                        "the folder reported on)")
    listing = sub.add_parser("list", help="defenses, attacks, judges and tasks")
    listing.add_argument("kind", nargs="?", choices=LIST_KINDS,
                         help="list only these (default: all four)")
    listing.add_argument("--json", action="store_true",
                         help="print JSON: per entry its name, summary, paper, reference, "
                              "options with defaults (and a defense's settings table)")
    sweep = sub.add_parser("sweep", help="run (or resume) a grid of runs from a sweep file")
    sweep.add_argument("sweep_file", type=Path)
    sweep.add_argument("overrides", nargs="*",
                       help="key=value settings for every run, after the file's `set`")
    sweep.add_argument("--out", type=Path, help="the sweep folder (default: the file's `out`, "
                       "else runs/sweeps/<file name>)")
    add_data_root(sweep)
    sweep.add_argument("--workers", type=int, default=1,
                       help="parallel worker processes (the CPU threads are split among them)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the planned runs, how far each got and which alignments "
                       "are still to train; run nothing")
    sweep.add_argument("--only", nargs="*", default=None, metavar="PATTERN",
                       help="run only the runs whose name matches one of these globs")
    sweep.add_argument("-v", "--verbose", action="store_true")
    add_backend_options(sweep)
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
    compare.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown",
                         help="markdown: the table (default); csv / json: one row per cell "
                              "with each metric's n, mean, std, interval and Δ as numbers")
    compare.add_argument("--out", type=Path, default=None,
                         help="write the output to this file instead of printing it")
    export = sub.add_parser(
        "export", help="copy the finished runs' records (metrics.json, config.yaml; no "
        "checkpoints, no completions) into a folder small enough to commit")
    export.add_argument("folder", type=Path, help="a run folder, a sweep folder or any folder "
                        "with finished runs below it")
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    add_judge_parser(sub)
    add_data_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    docs = sub.add_parser("docs", help="write docs/defenses.md: each defense's reference "
                          "settings beside hftlab's default and CPU preset")
    docs.add_argument("--out", type=Path, default=Path("docs/defenses.md"),
                      help="the markdown file (default: docs/defenses.md)")
    docs.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 when the file differs from what would be written")
    return parser


LIST_KINDS = ("defenses", "attacks", "judges", "tasks")


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where relative data paths are found; wins over HFTLAB_DATA_ROOT, "
                             "which wins over the config's data_root")


def use_data_root(args: argparse.Namespace) -> None:
    """``--data-root`` acts as HFTLAB_DATA_ROOT for this command and the processes it starts
    (sweep workers), so that one precedence rule serves both: flag, environment, config."""
    root = getattr(args, "data_root", None)
    if root is None or getattr(args, "command", None) not in ("run", "sweep"):
        return
    if not root.is_dir():
        raise ConfigError(f"--data-root {root}: no such folder; give the folder that holds "
                          "the data sets (e.g. ../shared/data)")
    os.environ["HFTLAB_DATA_ROOT"] = str(root.resolve())


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
    if not sys.stderr.isatty():  # the libraries' own bars (weight loading) as \r-joined junk
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        use_data_root(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            from hftlab.report import write_report

            out = args.out or args.run_dir
            print(write_report(args.run_dir, out))
            print(f"\nwrote {out / 'report.md'} and {out / 'report.html'}")
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
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "docs":
            return cmd_docs(args)
        return cmd_list(args.kind, args.json)
    except (ConfigError, DataError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        # one line, whatever a library put in the message
        print(f"hftlab: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line on what is saved and how to resume
        from hftlab.interrupt import interrupted_message

        print(interrupted_message(sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130


def take_late_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        extras: list[str]) -> None:
    """argparse fills the ``overrides`` positional only up to the first option, so in
    ``run CFG --out X seed=2`` the ``seed=2`` is left over: such key=value words become
    overrides, in order. Any other leftover is a UsageError with a did-you-mean."""
    if not extras:
        return
    if args.command in ("run", "sweep"):
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
    from hftlab.distributed import is_main_launch
    from hftlab.experiment import build_experiment
    from hftlab.pipeline import run_pipeline
    from hftlab.report import write_report

    config = load_config(args.config, args.overrides)
    experiment = build_experiment(config, str(args.config))  # every check, before any file
    run_dir = args.out or Path(config.out_dir or Path("runs") / args.config.stem)
    check_out_dir(run_dir, "--out" if args.out else "out_dir" if config.out_dir else "run folder")
    run_pipeline(config, run_dir, force=args.force, experiment=experiment)
    if not is_main_launch():  # data parallel: the main process writes the report
        return 0
    print(write_report(run_dir))
    print(f"\nrun folder: {run_dir} (metrics.json, report.md, report.html, eval/completions.jsonl)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hftlab.compare import compare_table
    from hftlab.sweep import describe_plan, load_sweep

    sweep = load_sweep(args.sweep_file, args.only, args.overrides, args.out)
    if args.dry_run:
        print("\n".join(describe_plan(sweep)))
        return 0
    check_out_dir(sweep.out, "--out" if args.out else f"{args.sweep_file}: out")
    failures = run_sweep_backend(sweep, args)
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
    from hftlab.compare_format import render_compare
    from hftlab.utils import atomic_write_text

    metrics = tuple(args.metrics) if args.metrics else None
    text = render_compare(args.folder, args.baseline, metrics, args.format)
    text = text if text.endswith("\n") else text + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give a file path")
    try:
        atomic_write_text(args.out, text)
    except OSError as exc:
        raise ConfigError(f"--out {args.out} cannot be written ({exc})") from exc
    print(f"wrote {args.out} ({args.format})")
    return 0


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


def cmd_list(kind: str | None, as_json: bool) -> int:
    from hftlab.listing import catalog, catalog_lines

    kinds = [kind] if kind else list(LIST_KINDS)
    entries = catalog(kinds)
    if as_json:
        import json

        print(json.dumps(entries if kind is None else entries[kind], indent=2,
                         ensure_ascii=False))
    else:
        print("\n".join(catalog_lines(entries)))
    return 0
