"""RepNoise's loss terms that need no model: the MMD between representations and Gaussian
noise, and the fused, chunked cross-entropy of the logit lens over every layer
(:class:`FusedLensCE`), which never holds a layer's full logits. The objective that uses them
is :mod:`hftlab.defenses.repnoise`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_MUL = 2.0
KERNEL_NUM = 5


def mmd_loss(
    x: torch.Tensor, y: torch.Tensor, kernel_mul: float = KERNEL_MUL, kernel_num: int = KERNEL_NUM
) -> torch.Tensor:
    """Maximum mean discrepancy between the rows of ``x`` and of ``y`` (same shape, (n, d)) with
    a sum of ``kernel_num`` Gaussian kernels exp(−‖a − b‖² / σ_i), σ_i = σ · kernel_mul^i,
    σ = mean off-diagonal squared distance / kernel_mul^(kernel_num // 2) (not differentiated).
    Returns mean(K_xx + K_yy − K_xy − K_yx), in float32 whatever autocast is active."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"mmd_loss needs two (n, d) tensors of one shape: {x.shape}, {y.shape}")
    with torch.autocast(x.device.type, enabled=False):
        total = torch.cat([x, y]).float()
        n = total.shape[0]
        squares = (total * total).sum(1)
        dist = (squares[:, None] + squares[None, :] - 2.0 * (total @ total.T)).clamp_min(0.0)
        dist = dist * (1.0 - torch.eye(n, device=dist.device, dtype=dist.dtype))
        bandwidth = dist.detach().sum() / (n * n - n)
        bandwidth = (bandwidth / kernel_mul ** (kernel_num // 2)).clamp_min(1e-12)
        kernels = sum(torch.exp(-dist / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
        b = x.shape[0]
        return (kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b]).mean()


def ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() == 0:  # nothing differs: the term vanishes instead of becoming NaN
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


UNDERFLOW_LOG_PROB = -80.0  # FusedLensCE's softmax is exactly 0 below e^-80
# the largest float32 below -80: log-probabilities at or under it are the ones dropped
_BELOW_UNDERFLOW = torch.nextafter(torch.tensor(UNDERFLOW_LOG_PROB),
                                   torch.tensor(float("-inf"))).item()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype matrix products run in under the active autocast on ``device`` (None: off)."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def lens_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM-head weight to hand :class:`FusedLensCE` for all the states of one step: a frozen
    weight cast once to the autocast dtype (autocast would cast the vocabulary × hidden matrix
    again at every product, two per state), else the weight itself."""
    low = autocast_dtype(weight.device)
    if low is None or weight.requires_grad:
        return weight
    return weight.to(low)


class FusedLensCE(torch.autograd.Function):
    """Mean cross-entropy of ``rows @ weight.T`` against ``targets`` whose gradient is formed in
    the forward pass, ``chunk`` rows at a time: d/d rows = (softmax − one-hot) @ weight / N and
    d/d weight = (softmax − one-hot)ᵀ @ rows / N (only for the inputs that need it). The
    N × vocabulary logits live one chunk at a time and are neither stored nor recomputed.
    Probabilities below e^-80 enter the gradient as 0 (see ``UNDERFLOW_LOG_PROB``). Matrix
    products follow the active autocast, as the unfused head would; the loss and the softmax
    are float32."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk):  # type: ignore[override]
        n = rows.shape[0]
        want_rows, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        low = autocast_dtype(rows.device)
        # one cast of the weight for every chunk's two products (what autocast does to each)
        projection = weight.to(low) if low is not None else weight
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if want_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight else None
        for start in range(0, n, chunk):
            part, part_targets = rows[start:start + chunk], targets[start:start + chunk]
            log_probs = torch.log_softmax(F.linear(part, projection).float(), dim=-1)
            total -= log_probs.gather(1, part_targets[:, None]).sum()
            if not (want_rows or want_weight):
                continue
            # exp of log-probabilities below e^-80 (≈ 1.8e-35, nothing next to a row's largest
            # probability ≥ 1/V) lands in the CPU's slow denormal range: once the ascent spreads
            # the lens logits, exp over the chunk ran ~7× slower. Those entries become -inf
            # (exp: exactly 0) in one pass.
            grad = F.threshold(log_probs, _BELOW_UNDERFLOW, float("-inf")).exp_()
            grad[torch.arange(len(part_targets), device=grad.device), part_targets] -= 1.0
            if low is None:
                grad /= n
                factor = projection.to(grad.dtype)
            else:  # divide and cast to the product dtype in one pass (autocast's cast, fused)
                scaled = torch.empty(grad.shape, dtype=low, device=grad.device)
                grad = torch.div(grad, n, out=scaled)
                factor = projection
            if want_rows:
                grad_rows[start:start + chunk] = (grad @ factor).to(rows.dtype)
            if want_weight:
                grad_weight += grad.T @ part.to(grad.dtype)
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_rows, grad_weight = ctx.saved_tensors
        weight_grad = None
        if grad_weight is not None:
            weight_grad = (grad_weight * grad_output).to(ctx.weight_dtype)
        return (grad_rows * grad_output.to(grad_rows.dtype) if grad_rows is not None else None,
                weight_grad, None, None)


LENS_CHUNK = 1024  # rows per vocabulary projection: 1024 × 49k float32 ≈ 200 MB at a time


def fusable_head(head: torch.nn.Module, softcap: float | None) -> bool:
    """Whether :class:`FusedLensCE` computes exactly what ``head`` does: a plain bias-free
    ``nn.Linear`` with an unsharded 2-D weight and no logit soft-capping."""
    return (type(head) is torch.nn.Linear and head.bias is None and not softcap
            and tuple(head.weight.shape) == (head.out_features, head.in_features))


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against ``targets`` (...) over the positions
    where ``mask`` is true (already aligned: ``logits[i]`` predicts ``targets[i]``); 0 if none."""
    mask = mask.bool()
    return ce_rows(logits[mask], targets[mask])
