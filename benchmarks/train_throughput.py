"""Training throughput: hftlab's trainer against a plain ``transformers.Trainer`` SFT baseline.

Same model, same LoRA, same tokenised data (prompt masked out of the labels), same batch size
and number of optimizer steps, side by side in one process. Prints tokens/s (non-padding
tokens seen per second of training) for each, the ratio, and the mean loss over the steps so
that a speed-up is not bought with a different objective.

    python benchmarks/train_throughput.py                 # embedded SmolLM2-135M, demo data
    python benchmarks/train_throughput.py --steps 30 --model /path/to/model --batch-size 8

The baseline is what a user gets from the library defaults: fp32 on a CPU (``bf16=False``),
full-vocabulary logits, random batches. hftlab adds bf16 autocast where the CPU/GPU has it,
logits only at supervised positions and length-grouped batches. ``--ablate`` also runs hftlab
with each of those switched off, to show what each one buys.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hftlab.config import ModelConfig, TrainConfig
from hftlab.context import resolve_precision
from hftlab.data.loaders import load_examples
from hftlab.data.spec import DataSpec
from hftlab.defenses import DEFENSES
from hftlab.formatting import PromptFormatter, Tokenized
from hftlab.model import attach_trainable, load_model, load_tokenizer, resolve_model_path
from hftlab.tasks import TASKS
from hftlab.train import IGNORE_INDEX, SFTTrainer, collate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "hftlab"))
    parser.add_argument("--ablate", action="store_true", help="also time each speed-up alone")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="hftlab's compute precision (auto: bf16 where the CPU has it "
                        "natively); bf16 on a CPU without AVX512-BF16/AMX times emulated bf16")
    return parser.parse_args()


def benchmark_data(formatter: PromptFormatter, rows: int) -> list[Tokenized]:
    """A mix like the user's job: SST-2-style task rows and harmful QA rows (demo pack)."""
    task = TASKS["sst2"]
    examples = [task.format(e) for e in load_examples(DataSpec("demo_sentiment", n=rows // 2))]
    examples += load_examples(DataSpec("demo_refusal", n=rows - rows // 2))
    random.Random(0).shuffle(examples)
    return [formatter.encode(e, 256) for e in examples]


def fresh_model(path: str, train: TrainConfig, model_cfg: ModelConfig | None, precision: str):
    """hftlab's loading (``model_cfg``) or, with None, plain ``from_pretrained`` defaults."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if model_cfg is None:
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = load_model(path, model_cfg, torch.device("cpu"), precision)
    torch.manual_seed(0)
    return attach_trainable(model, train)


def run_baseline(
    path: str, items: list[Tokenized], train: TrainConfig, pad_id: int, bf16: bool = False
) -> dict:
    """``transformers.Trainer`` with its defaults for SFT on a CPU (``bf16=True``: its own
    mixed precision, autocast over fp32 weights)."""
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> Tokenized:
            return items[i]

    def collator(batch: list[Tokenized]) -> dict[str, torch.Tensor]:
        b = collate(batch, pad_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    tokens = 0

    class CountingTrainer(Trainer):
        def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any):
            nonlocal tokens
            tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    model = fresh_model(path, train, None, "fp32")
    args = TrainingArguments(
        output_dir="/tmp/hftlab-bench-baseline",
        per_device_train_batch_size=train.batch_size,
        max_steps=train.max_steps,
        learning_rate=train.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        seed=0,
        disable_tqdm=True,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=Rows(), data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"tokens": tokens, "seconds": seconds, "mean_loss": sum(losses) / len(losses)}


def run_hftlab(
    path: str,
    items: list[Tokenized],
    train: TrainConfig,
    pad_id: int,
    precision: str,
    supervised_only: bool = True,
    grouped: bool = True,
    model_cfg: ModelConfig | None = None,
) -> dict:
    from accelerate import Accelerator

    model = fresh_model(path, train, model_cfg or ModelConfig(), precision)
    defense = DEFENSES.get("sft")()
    trainer = SFTTrainer(
        model, train, Accelerator(), pad_id, "finetune", defense, seed=0, precision=precision
    )
    if not supervised_only:
        def full_logits_loss(batch):  # what a plain causal-LM forward computes
            with trainer.autocast():
                logits = trainer.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).logits.float()
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                batch.labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )

        trainer.compute_loss = full_logits_loss  # type: ignore[method-assign]
    patch = contextlib.nullcontext()
    if not grouped:
        import hftlab.train as train_module

        def random_batches(lengths, batch_size, rng, mega=50):
            order = list(range(len(lengths)))
            rng.shuffle(order)
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

        patch = _patched(train_module, "length_grouped_batches", random_batches)
    with patch:
        result = trainer.train(items)
    return {
        "tokens": result.tokens,
        "seconds": result.seconds,
        "mean_loss": sum(result.losses) / len(result.losses),
    }


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def main() -> None:
    args = parse_args()
    path = resolve_model_path(args.model, Path(args.cache_dir))
    tokenizer = load_tokenizer(path, ModelConfig())
    formatter = PromptFormatter(tokenizer, ModelConfig())
    items = benchmark_data(formatter, args.rows)
    needed = args.steps * args.batch_size
    items = (items * math.ceil(needed / len(items)))[:needed]  # one pass, no epoch boundary
    train = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    pad_id = tokenizer.pad_token_id
    print(f"model {args.model} · {args.steps} steps × batch {args.batch_size} · "
          f"LoRA r={train.lora.r} on {len(train.lora.target_modules)} modules · "
          f"threads {torch.get_num_threads()} · hftlab precision {precision}")
    runs = {"transformers.Trainer (baseline)": run_baseline(path, items, train, pad_id)}
    runs["hftlab fp32"] = run_hftlab(path, items, train, pad_id, "fp32")
    if precision == "bf16":
        runs["transformers.Trainer bf16=True"] = run_baseline(path, items, train, pad_id, True)
        runs["hftlab bf16"] = run_hftlab(path, items, train, pad_id, precision)
    if args.ablate and precision == "bf16":
        runs["hftlab fp32 weights + autocast"] = run_hftlab(
            path, items, train, pad_id, precision, model_cfg=ModelConfig(dtype="float32")
        )
        runs["hftlab sdpa attention"] = run_hftlab(
            path, items, train, pad_id, precision, model_cfg=ModelConfig(attn_implementation="sdpa")
        )
        runs["hftlab full logits"] = run_hftlab(path, items, train, pad_id, precision,
                                                supervised_only=False)
        runs["hftlab random batches"] = run_hftlab(path, items, train, pad_id, precision,
                                                   grouped=False)
    base = runs["transformers.Trainer (baseline)"]
    base_rate = base["tokens"] / base["seconds"]
    print(f"\n{'run':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'ratio':>7}{'mean loss':>11}")
    for name, r in runs.items():
        rate = r["tokens"] / r["seconds"]
        print(f"{name:<34}{r['tokens']:>8}{r['seconds']:>9.1f}{rate:>8.0f}"
              f"{rate / base_rate:>6.2f}×{r['mean_loss']:>11.4f}")
    print("\nsame precision, side by side (ratio at matching numerics):")
    pairs = [("hftlab fp32", "transformers.Trainer (baseline)"),
             ("hftlab bf16", "transformers.Trainer bf16=True")]
    for ours, theirs in pairs:
        if ours in runs and theirs in runs:
            a, b = runs[ours], runs[theirs]
            ratio = (a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"])
            print(f"  {ours} / {theirs}: {ratio:.2f}× · mean loss "
                  f"{a['mean_loss']:.4f} vs {b['mean_loss']:.4f}")


if __name__ == "__main__":
    main()
