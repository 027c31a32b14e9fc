"""RepNoise's logit lens: the fused CE (gradient formed in the forward pass) against the
unfused one (logits recomputed in the backward pass by ``torch.utils.checkpoint``).

One hidden state's lens term, forward and backward, side by side in one process, alternating
so that machine noise hits both: N masked harmful tokens of width H through a final norm onto
a V-word bias-free head (frozen, as under LoRA). RepNoise pays this once per hidden state
(L + 1 = 31 on SmolLM2-135M) every optimizer step. Prints seconds per state for each path,
the ratio, and the largest difference in loss and gradient (the two must agree).

    python benchmarks/repnoise_lens.py                          # SmolLM2-135M sizes
    python benchmarks/repnoise_lens.py --tokens 2000 --hidden 4096 --vocab 32000 --repeats 2
    python benchmarks/repnoise_lens.py --config configs/cpu_sst2.yaml   # whole RepNoise loss

With ``--config``, the whole RepNoise objective (both forwards, the MMD, all L + 1 lens terms
and the backward) on the config's model with LoRA, a real refusal batch and a real batch of the
provider's harmful QA, once with the fused lens and once with the unfused one.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hftlab.defenses.repnoise as repnoise
from hftlab.defenses.repnoise import LENS_CHUNK, FusedLensCE

# options of the synthetic benchmark only; with --config the config decides these
SYNTHETIC_ONLY = ("tokens", "hidden", "vocab", "dtype", "logit_scale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="masked harmful tokens N")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size V")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: under bf16 autocast, as model.precision=bf16 trains")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="scale the head's weight: 30 spreads the logits as RepNoise's "
                        "ascent leaves them late in alignment (many probabilities < e^-80)")
    parser.add_argument("--config", help="time the whole RepNoise loss on this config instead")
    return parser


def whole_loss(config_path: str, repeats: int) -> None:
    """Both lens paths inside the real objective: the unfused one by declaring the head not
    fusable, which is the path a LoRA-wrapped or soft-capped head takes."""
    from pathlib import Path

    from hftlab.config import load_config
    from hftlab.context import RunContext, seed_everything
    from hftlab.model import attach_trainable
    from hftlab.train import collate

    config = load_config(config_path, [])
    ctx = RunContext(config, Path("/tmp/hftlab-bench-lens"))
    train = config.alignment.train
    seed_everything(0)
    model = attach_trainable(ctx.base_model(), train)
    pad = ctx.tokenizer.pad_token_id
    harmless = collate(ctx.tokenize(ctx.data.alignment, train.max_length)[:train.batch_size], pad)
    harmful = collate(
        ctx.tokenize(ctx.data.provider_harmful, train.max_length)[:train.batch_size], pad)
    masked = int(repnoise.difference_mask(harmful, harmless)[:, 1:].sum())
    fusable = repnoise.fusable_head
    seconds: dict[str, list[float]] = {"unfused (baseline)": [], "fused": []}
    losses: dict[str, float] = {}
    try:
        for _ in range(repeats):
            for name in seconds:
                repnoise.fusable_head = fusable if name == "fused" else (lambda head, cap: False)
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss, _ = repnoise.repnoise_loss(model, harmful, harmless,
                                                 autocast=ctx.autocast,
                                                 generator=torch.Generator().manual_seed(0))
                loss.backward()
                seconds[name].append(time.perf_counter() - start)
                losses[name] = float(loss)
    finally:
        repnoise.fusable_head = fusable
    print(f"config {config_path} · precision {ctx.precision} · batch {train.batch_size} · "
          f"{masked} masked harmful tokens · {len(repnoise.decoder_layers(model)) + 1} lens "
          f"states · threads {torch.get_num_threads()} · best of {repeats}")
    base = min(seconds["unfused (baseline)"])
    for name, values in seconds.items():
        print(f"{name:<24}{min(values):>8.2f} s/loss+backward{base / min(values):>7.2f}× faster"
              f"   loss {losses[name]:.5f}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.config:
        ignored = ["--" + name.replace("_", "-") for name in SYNTHETIC_ONLY
                   if getattr(args, name) != parser.get_default(name)]
        if ignored:
            raise SystemExit(f"{', '.join(ignored)}: only for the synthetic benchmark; with "
                             "--config the model, data and precision come from the config")
        whole_loss(args.config, args.repeats)
        return
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    head.requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(args.logit_scale)
    norm = torch.nn.LayerNorm(args.hidden, device=device)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    states = torch.randn(args.tokens, args.hidden, device=device)

    def unfused(rows: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda r: F.cross_entropy(head(norm(r)).float(), targets), rows,
                          use_reentrant=False)

    def fused(rows: torch.Tensor) -> torch.Tensor:
        return FusedLensCE.apply(norm(rows), head.weight, targets, LENS_CHUNK)

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    seconds: dict[str, list[float]] = {"checkpoint (baseline)": [], "fused": []}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, path in (("checkpoint (baseline)", unfused), ("fused", fused)):
            rows = states.clone().requires_grad_(True)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = path(rows)
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
            results[name] = (loss.detach(), rows.grad)

    print(f"N {args.tokens} · H {args.hidden} · V {args.vocab} · {args.dtype} · logit scale "
          f"{args.logit_scale:g} · {device} · "
          f"threads {torch.get_num_threads()} · best of {args.repeats}")
    base = min(seconds["checkpoint (baseline)"])
    for name, values in seconds.items():
        print(f"{name:<24}{min(values):>8.3f} s/state{base / min(values):>7.2f}× faster")
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    print(f"max |Δ loss| {float((loss_a - loss_b).abs()):.2e} · "
          f"max |Δ grad| {float((grad_a - grad_b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
