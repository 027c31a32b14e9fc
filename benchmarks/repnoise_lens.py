"""RepNoise's logit lens: the fused CE (gradient formed in the forward pass) against the
unfused one (logits recomputed in the backward pass by ``torch.utils.checkpoint``).

One hidden state's lens term, forward and backward, side by side in one process, alternating
so that machine noise hits both: N masked harmful tokens of width H through a final norm onto
a V-word bias-free head (frozen, as under LoRA). RepNoise pays this once per hidden state
(L + 1 = 31 on SmolLM2-135M) every optimizer step. Prints seconds per state for each path,
the ratio, and the largest difference in loss and gradient (the two must agree).

    python benchmarks/repnoise_lens.py                          # SmolLM2-135M sizes
    python benchmarks/repnoise_lens.py --tokens 2000 --hidden 4096 --vocab 32000 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hftlab.defenses.repnoise import LENS_CHUNK, FusedLensCE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="masked harmful tokens N")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size V")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: under bf16 autocast, as model.precision=bf16 trains")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    head.requires_grad_(False)
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

    print(f"N {args.tokens} · H {args.hidden} · V {args.vocab} · {args.dtype} · {device} · "
          f"threads {torch.get_num_threads()} · best of {args.repeats}")
    base = min(seconds["checkpoint (baseline)"])
    for name, values in seconds.items():
        print(f"{name:<24}{min(values):>8.3f} s/state{base / min(values):>7.2f}× faster")
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    print(f"max |Δ loss| {float((loss_a - loss_b).abs()):.2e} · "
          f"max |Δ grad| {float((grad_a - grad_b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
