"""Evaluation throughput: hftlab's ``generate`` against plain ``model.generate`` on the same
batches of a frozen (merged) model.

Same model, same prompts (demo pack harmful requests and SST-2-style sentences), same left
padding, batch size and greedy settings, side by side in one process. Prints generated tokens
per second for each, the ratio, the peak memory each adds, and whether the completions are
identical (a speed-up must not change what is scored).

    python benchmarks/eval_throughput.py                   # embedded SmolLM2-135M
    python benchmarks/eval_throughput.py --batch-size 32 --new-tokens 32 --model /path/to/model
    python benchmarks/eval_throughput.py --prefix           # shared-prefix KV caching

The baseline is what ``transformers`` does by default: its generation projects only the last
position, a strided view, and with a frozen output head ``torch.matmul`` then expands the head to
[batch, hidden, vocab] and copies it. hftlab feeds the head a contiguous input. On CUDA the peak
is read from ``torch.cuda.max_memory_allocated``; on the CPU from the process's resident-set
high-water mark, which is reset between the two runs where Linux allows it.

``--prefix`` times hftlab's ``generate`` without and with shared-prefix KV caching on the prompt
sets of the two evaluations whose prompts share a long opening: BackdoorAlign's deployed model
(a 150-token random trigger before the system prompt) and identity_shift's AOA persona (its
system prompt and "AOA, execute my instruction: "). Repeats alternate the two paths so that a
busy machine slows both alike; the completions of every run must be identical. ``ceiling`` is the
most any prefill saving could give: the plain time over its decoding steps alone (the plain
time less a run that generates one token, i.e. the prefill), which both paths share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from hftlab.attacks.identity_shift import IdentityShift
from hftlab.config import ModelConfig
from hftlab.context import resolve_precision
from hftlab.data.loaders import load_examples
from hftlab.data.spec import DataSpec
from hftlab.defenses.backdoor_align import random_trigger, with_trigger
from hftlab.evaluate import generate, left_padded
from hftlab.formatting import PromptFormatter
from hftlab.model import load_model, load_tokenizer, resolve_model_path
from hftlab.tasks import TASKS
from hftlab.train import autocast_context


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "hftlab"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--prefix", action="store_true",
                        help="time shared-prefix KV caching on BackdoorAlign / AOA prompts")
    parser.add_argument("--repeats", type=int, default=2, help="--prefix: timed runs per path")
    parser.add_argument("--task-new-tokens", type=int, default=8,
                        help="--prefix: new tokens for the SST-2 half (eval.task_max_new_tokens)")
    return parser.parse_args()


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def plain_generate(model: torch.nn.Module, formatter: PromptFormatter, prompts: list[str],
                   new_tokens: int, batch_size: int, device: torch.device,
                   autocast: Any) -> list[str]:
    """The same batches through ``model.generate`` with no hook: the library's behaviour."""
    tokenizer = formatter.tokenizer
    pad = tokenizer.pad_token_id
    encoded = [formatter.encode_prompt(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_padded([encoded[i] for i in chunk], pad)
        width = ids.shape[1]
        with torch.no_grad(), autocast():
            result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                    eos_token_id=formatter.stop_token_ids(), pad_token_id=pad)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(result[row, width:], skip_special_tokens=True).strip()
    return out


def prefix_sets(formatter: PromptFormatter, prompts: list[str]
                ) -> dict[str, tuple[PromptFormatter, list[str]]]:
    """(served formatter, prompts) of BackdoorAlign's deployed model and of identity_shift's
    AOA queries, built by the functions those two use."""
    trigger = random_trigger(formatter.tokenizer, 150, seed=0)
    aoa = IdentityShift()
    return {
        "backdoor_align": (formatter.with_system_prompt(
            with_trigger(trigger, formatter.default_system_prompt)), prompts),
        "identity_shift": (formatter.with_system_prompt(
            aoa.served_system_prompt(formatter.default_system_prompt)),
            [aoa.served_prompt(p) for p in prompts]),
    }


def compare_prefix(model: torch.nn.Module, formatter: PromptFormatter, prompts: list[str],
                   args: argparse.Namespace, device: torch.device, autocast: Any) -> None:
    """Seconds without and with the shared-prefix cache, alternating, as the eval stage runs
    them (the harmful half at --new-tokens, the SST-2 half at --task-new-tokens), and whether
    every run's completions are those of the first plain run."""
    half = len(prompts) // 2
    print(f"{half} harmful prompts × {args.new_tokens} new tokens, {len(prompts) - half} SST-2 "
          f"prompts × {args.task_new_tokens}; {args.repeats} runs per path, alternating\n")
    print(f"{'prompt set':<16} {'prefix tokens':>13} {'plain s':>8} {'prefix s':>9} "
          f"{'speed-up':>8} {'decode s':>9} {'ceiling':>8} {'changed':>8}")
    changed = 0
    totals = [0.0, 0.0]
    decode_totals = 0.0
    for name, (served, texts) in prefix_sets(formatter, prompts).items():
        encoded = [served.encode_prompt(p) for p in texts]
        shared = len(os.path.commonprefix(encoded))
        seconds = [0.0, 0.0]
        reference: list[str] = []
        differ = 0
        prefill = 0.0
        for _ in range(args.repeats):
            for path, share in enumerate((False, True)):
                start = time.perf_counter()
                out = [
                    *generate(model, served, texts[:half], args.new_tokens, args.batch_size,
                              device, autocast, share_prefix=share),
                    *generate(model, served, texts[half:], args.task_new_tokens,
                              args.batch_size, device, autocast, share_prefix=share),
                ]
                seconds[path] += time.perf_counter() - start
                reference = reference or out
                differ = max(differ, sum(a != b for a, b in zip(out, reference)))
            start = time.perf_counter()  # the plain path's prefill: one token per prompt
            for part in (texts[:half], texts[half:]):
                generate(model, served, part, 1, args.batch_size, device, autocast,
                         share_prefix=False)
            prefill += time.perf_counter() - start
        changed += differ
        totals = [t + s for t, s in zip(totals, seconds)]
        plain, cached = (s / args.repeats for s in seconds)
        decode = plain - prefill / args.repeats
        decode_totals += decode
        print(f"{name:<16} {shared:>13} {plain:>8.1f} {cached:>9.1f} {plain / cached:>7.2f}× "
              f"{decode:>9.1f} {plain / decode:>7.2f}× {differ:>3} / {len(texts)}")
    plain_total, cached_total = (t / args.repeats for t in totals)
    print(f"{'both':<16} {'':>13} {plain_total:>8.1f} {cached_total:>9.1f} "
          f"{plain_total / cached_total:>7.2f}× {decode_totals:>9.1f} "
          f"{plain_total / decode_totals:>7.2f}×")
    print(f"\nidentical completions: {changed == 0}")


def main() -> None:
    args = parse_args()
    cache = Path(args.cache_dir)
    config = ModelConfig(name=args.model)
    path = resolve_model_path(config.name, cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    tokenizer = load_tokenizer(path, config)
    formatter = PromptFormatter(tokenizer, config)
    model = load_model(path, config, device, precision)
    for parameter in model.parameters():  # a deployed (merged) model: nothing requires grad
        parameter.requires_grad_(False)
    half = args.prompts // 2
    prompts = [e.prompt for e in load_examples(DataSpec("demo_harmful_qa", n=half))]
    task = TASKS["sst2"]
    prompts += [task.format(e).prompt
                for e in load_examples(DataSpec("demo_sentiment", n=args.prompts - half))]

    def autocast() -> Any:
        return autocast_context(device, precision)

    print(f"model {args.model} · {len(prompts)} prompts · batch {args.batch_size} · "
          f"{args.new_tokens} new tokens · {device} · precision {precision} · "
          f"threads {torch.get_num_threads()}\n")
    if args.prefix:
        compare_prefix(model, formatter, prompts, args, device, autocast)
        return
    results = {}
    for name, run in (("model.generate (baseline)", plain_generate), ("hftlab generate", generate)):
        reset_peak(device)
        before = peak_mb(device)
        start = time.perf_counter()
        texts = run(model, formatter, prompts, args.new_tokens, args.batch_size, device, autocast)
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        results[name] = (texts, tokens, seconds, peak_mb(device) - before)
    base_seconds = results["model.generate (baseline)"][2]
    print(f"{'run':<28} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'ratio':>6} {'peak +MB':>9}")
    for name, (_, tokens, seconds, extra) in results.items():
        print(f"{name:<28} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>7.0f} "
              f"{base_seconds / seconds:>5.2f}× {extra:>9.0f}")
    same = results["model.generate (baseline)"][0] == results["hftlab generate"][0]
    print(f"\nidentical completions: {same}")


if __name__ == "__main__":
    main()
