"""RepNoise's loss, term by term, against hand computations: the Gaussian-kernel MMD written out
pair by pair, the masked CE, the difference mask, and on the tiny model the whole objective
CE(harmless) + β·mean MMD − α·log(1 + mean logit-lens CE) from independently taken hidden
states (``output_hidden_states`` and forward hooks), including the gradient it leaves. α defaults
to the reference matching the run: 0.1 under LoRA (git-disl's port), 1 under full fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import (
    PAD_ID,
    Cycle,
    autograd_of,
    make_trainer,
    param_grads,
    token_batch,
    token_items,
)

from hftlab.config import ConfigError, load_config
from hftlab.defenses import DEFENSES
from hftlab.defenses.repnoise import (
    UNDERFLOW_LOG_PROB,
    FusedLensCE,
    difference_mask,
    fusable_head,
    masked_ce,
    mmd_loss,
    repnoise_loss,
)
from hftlab.formatting import Tokenized
from hftlab.train import Batch, collate

# --- MMD -----------------------------------------------------------------------------------


def loop_mmd(x: torch.Tensor, y: torch.Tensor, mul: float = 2.0, num: int = 5) -> float:
    """The reference's MMD_loss written out over every pair of rows, in float64."""
    rows = [r.double() for r in x] + [r.double() for r in y]
    n = len(rows)
    dist = [[float(((a - b) ** 2).sum()) for b in rows] for a in rows]
    bandwidth = sum(sum(r) for r in dist) / (n * n - n) / mul ** (num // 2)
    kern = [[sum(math.exp(-dist[i][j] / (bandwidth * mul**q)) for q in range(num))
             for j in range(n)] for i in range(n)]
    b = len(x)
    total = sum(kern[i][j] + kern[b + i][b + j] - kern[i][b + j] - kern[b + i][j]
                for i in range(b) for j in range(b))
    return total / (b * b)


def expand_mmd(x: torch.Tensor, y: torch.Tensor, mul: float = 2.0, num: int = 5) -> torch.Tensor:
    """Differentiable MMD with the reference's (2n, 2n, d) difference tensor (not a Gram
    matrix) and its detached bandwidth."""
    total = torch.cat([x, y]).float()
    n = total.shape[0]
    dist = ((total[None, :, :] - total[:, None, :]) ** 2).sum(2)
    bandwidth = dist.detach().sum() / (n * n - n) / mul ** (num // 2)
    kern = sum(torch.exp(-dist / (bandwidth * mul**q)) for q in range(num))
    b = x.shape[0]
    return (kern[:b, :b] + kern[b:, b:] - kern[:b, b:] - kern[b:, :b]).mean()


def test_mmd_matches_pairwise_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g) * 0.5 + 0.3
    y = torch.randn(3, 6, generator=g)
    got = mmd_loss(x, y)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), loop_mmd(x, y), rel_tol=1e-5, abs_tol=1e-6)
    assert float(got) > 0.01
    # identical inputs: no discrepancy (rows distinct, so the bandwidth is positive)
    assert abs(float(mmd_loss(x, x.clone()))) < 1e-6
    # an all-zero pair (nothing masked in) is 0, not NaN
    zeros = torch.zeros(2, 4)
    assert float(mmd_loss(zeros, zeros)) == 0.0
    with pytest.raises(ValueError):
        mmd_loss(x, y[:2])


def test_mmd_gradient_matches_difference_tensor_form() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, generator=g, requires_grad=True)
    y = torch.randn(4, 10, generator=g)
    (grad_got,) = torch.autograd.grad(mmd_loss(x, y), x)
    (grad_want,) = torch.autograd.grad(expand_mmd(x, y), x)
    assert torch.allclose(grad_got, grad_want, atol=1e-6, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the math stays float32
        assert mmd_loss(x, y).dtype == torch.float32


# --- masked CE and mask --------------------------------------------------------------------


def test_masked_ce_is_cross_entropy_over_masked_positions() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    picked = [(b, t) for b in range(2) for t in range(5) if mask[b, t]]
    want = sum(float(F.cross_entropy(logits[b, t][None], targets[b, t][None]))
               for b, t in picked) / len(picked)
    assert math.isclose(float(masked_ce(logits, targets, mask)), want, rel_tol=1e-6)
    assert float(masked_ce(logits, targets, torch.zeros_like(mask))) == 0.0


def ids_batch(ids: list[list[int]], real: list[list[int]]) -> Batch:
    input_ids = torch.tensor(ids)
    attention = torch.tensor(real)
    return Batch(input_ids, attention, torch.full_like(input_ids, -100))


def test_mask_counts_real_harmful_tokens_that_differ() -> None:
    harmful = ids_batch(
        [[1, 5, 6, 7, 8], [1, 5, 9, 0, 0], [1, 2, 3, 4, 0]],
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
    )
    # narrower (4 columns) and fewer rows (2) than the harmful batch
    harmless = ids_batch([[1, 5, 7, 7], [1, 4, 9, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
    want = torch.tensor([
        [0, 0, 1, 0, 1],  # 6≠7; 8 is beyond the harmless width
        [0, 1, 0, 1, 0],  # real token 0 vs harmless padding counts; harmful padding never
        [1, 1, 1, 1, 0],  # no harmless row
    ], dtype=torch.bool)
    assert torch.equal(difference_mask(harmful, harmless), want)
    # wider and with more rows than the harmful batch: cut to the harmful shape
    wide = ids_batch([[1, 5, 6, 9, 8, 3], [1, 5, 9, 0, 2, 2], [1, 2, 3, 4, 4, 4], [7] * 6],
                     [[1] * 6, [1, 1, 1, 1, 1, 1], [1] * 6, [1] * 6])
    want = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(difference_mask(harmful, wide), want)


# --- the whole objective on the tiny model -------------------------------------------------


def paired_batches() -> tuple[Batch, Batch]:
    """A refusal batch with answers and a harmful batch sharing each row's prompt, some
    answer tokens and some padding, and differing elsewhere (and in length)."""
    harmless_items = token_items(4, seed=1)
    harmful_items = []
    for i, item in enumerate(harmless_items):
        ids = list(item.input_ids)
        answer = [(t * 7 + i) % 190 + 4 if k % 2 else t
                  for k, t in enumerate(ids[item.n_prompt:])]
        harmful_items.append(Tokenized(ids[: item.n_prompt] + answer + [11] * (i % 3),
                                       item.n_prompt))
    return collate(harmful_items, PAD_ID), collate(harmless_items, PAD_ID)


def hand_mask(harmful: Batch, harmless: Batch) -> torch.Tensor:
    mask = torch.zeros_like(harmful.input_ids, dtype=torch.bool)
    for b in range(harmful.input_ids.shape[0]):
        for t in range(harmful.input_ids.shape[1]):
            if not harmful.attention_mask[b, t]:
                continue
            inside = (b < harmless.input_ids.shape[0] and t < harmless.input_ids.shape[1]
                      and harmless.attention_mask[b, t])
            mask[b, t] = not inside or harmless.input_ids[b, t] != harmful.input_ids[b, t]
    return mask


def hand_objective(model, harmful, harmless, alpha, beta, seed):
    """The RepNoise terms from hidden states taken independently of the implementation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers, norm, head = base.model.layers, base.model.norm, base.lm_head
    mlp_out: list[torch.Tensor] = [None] * len(layers)
    last: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_hook(
        lambda m, a, o, i=i: mlp_out.__setitem__(i, o)) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o)))
    out = model(input_ids=harmful.input_ids, attention_mask=harmful.attention_mask,
                output_hidden_states=True)
    for h in handles:
        h.remove()
    # transformers returns the last state after the final norm; the lens reads the raw one
    assert torch.allclose(out.hidden_states[-1], norm(last[0]), atol=1e-6)
    states = [*out.hidden_states[:-1], last[0]]

    mask = hand_mask(harmful, harmless)
    gen = torch.Generator().manual_seed(seed)
    mmds = []
    for act in mlp_out:
        keep = mask[..., None].float()
        noise = torch.randn(act.shape, generator=gen) * keep
        mmds.append(expand_mmd((act * keep).flatten(1), noise.flatten(1)))
    pos = mask[:, 1:]
    targets = harmful.input_ids[:, 1:][pos]
    lens = [F.cross_entropy(head(norm(s))[:, :-1][pos], targets) for s in states]
    # the last state's lens is the model's own output CE
    assert torch.allclose(lens[-1], F.cross_entropy(out.logits[:, :-1][pos], targets), atol=1e-5)

    logits = model(input_ids=harmless.input_ids, attention_mask=harmless.attention_mask).logits
    harmless_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), harmless.labels[:, 1:].flatten(),
                                  ignore_index=-100)
    noise_mean = torch.stack(mmds).mean()
    lens_mean = torch.stack(lens).mean()
    total = harmless_ce + beta * noise_mean - alpha * torch.log(1 + lens_mean)
    return total, {"harmless_loss": harmless_ce, "noise_loss": noise_mean,
                   "harmful_lens_loss": lens_mean}, mask


@pytest.fixture(params=["lora", "plain"])
def tiny_any(request, tiny_model_dir):
    if request.param == "lora":
        return request.getfixturevalue("tiny_lora")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_repnoise_loss_matches_hand_computation(tiny_any) -> None:
    harmful, harmless = paired_batches()
    got, parts = repnoise_loss(tiny_any, harmful, harmless, alpha=0.7, beta=3.0,
                               generator=torch.Generator().manual_seed(5))
    want, want_parts, mask = hand_objective(tiny_any, harmful, harmless, 0.7, 3.0, seed=5)
    # the pairing leaves shared prompts and answer tokens out, and some answer tokens in
    assert 0 < int(mask.sum()) < int(harmful.attention_mask.sum())
    assert torch.equal(difference_mask(harmful, harmless), mask)
    for name, value in want_parts.items():
        assert torch.allclose(parts[name], value, atol=1e-5, rtol=1e-5), name
    assert parts["noise_loss"].item() > 0 and parts["harmful_lens_loss"].item() > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_repnoise_loss_under_bf16_autocast(tiny_lora) -> None:
    harmful, harmless = paired_batches()
    noise = torch.Generator().manual_seed(1)
    fp32, _ = repnoise_loss(tiny_lora, harmful, harmless, generator=noise)
    bf16, parts = repnoise_loss(
        tiny_lora, harmful, harmless, generator=torch.Generator().manual_seed(1),
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    assert all(v.dtype == torch.float32 for v in parts.values())
    assert torch.isfinite(bf16) and math.isclose(bf16.item(), fp32.item(), rel_tol=0.05)
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_lora.parameters() if p.grad is not None)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_training_step_leaves_gradient_of_hand_objective(tiny_lora, grad_accum) -> None:
    defense = DEFENSES.get("repnoise")(alpha=0.7, beta=3.0)
    trainer = make_trainer(tiny_lora, defense, grad_accum=grad_accum)
    defense.setup("alignment", trainer)
    harmful, harmless = paired_batches()
    defense.harmful = Cycle(harmful)
    defense.noise = torch.Generator().manual_seed(9)
    stats = defense.training_step("alignment", trainer, harmless)
    got = param_grads(tiny_lora)
    tiny_lora.zero_grad(set_to_none=True)

    want, parts, _ = hand_objective(tiny_lora, harmful, harmless, 0.7, 3.0, seed=9)
    assert math.isclose(stats["loss"], want.item(), rel_tol=1e-5, abs_tol=1e-5)
    for name, value in parts.items():
        assert math.isclose(stats[name], value.item(), rel_tol=1e-5, abs_tol=1e-5), name
    expected = autograd_of(tiny_lora, want)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value / grad_accum, atol=1e-6, rtol=1e-4), name
    assert defense.report("alignment")["noise_loss_first"] == pytest.approx(
        parts["noise_loss"].item(), rel=1e-5)


@pytest.mark.parametrize(("method", "option", "alpha"), [
    ("lora", None, 0.1),  # git-disl/Booster script/alignment/repNoise.sh: alpha=0.1
    ("full", None, 1.0),  # domenicrosati/representation-noising: alpha=1
    ("full", 0.7, 0.7),  # a value given wins
])
def test_alpha_follows_the_stage_method_and_weights_the_loss(
        tiny_model_dir, tiny_lora, method, option, alpha) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_lora if method == "lora" else AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32)
    defense = DEFENSES.get("repnoise")(alpha=option)
    trainer = make_trainer(model, defense, method=method)
    defense.setup("alignment", trainer)
    assert defense.alpha_used == alpha
    assert defense.report("alignment") == {"alpha_used": alpha}  # before any step
    harmful, harmless = paired_batches()
    defense.harmful = Cycle(harmful)
    defense.noise = torch.Generator().manual_seed(4)
    stats = defense.training_step("alignment", trainer, harmless)
    model.zero_grad(set_to_none=True)
    # the weighted sum by hand: CE + β·MMD − α·log(1 + lens CE), β = 0.001
    weighted = (stats["harmless_loss"] + 0.001 * stats["noise_loss"]
                - alpha * math.log1p(stats["harmful_lens_loss"]))
    assert math.isclose(stats["loss"], weighted, rel_tol=1e-5, abs_tol=1e-6)
    want, _, _ = hand_objective(model, harmful, harmless, alpha, 0.001, seed=4)
    assert math.isclose(stats["loss"], want.item(), rel_tol=1e-5, abs_tol=1e-5)
    other = 1.0 if alpha != 1.0 else 0.1  # the other reference's α gives another loss
    assert not math.isclose(stats["loss"], stats["harmless_loss"] + 0.001 * stats["noise_loss"]
                            - other * math.log1p(stats["harmful_lens_loss"]), rel_tol=1e-4)
    assert defense.report("alignment")["alpha_used"] == alpha


def test_identical_batches_leave_only_the_harmless_loss(tiny_lora) -> None:
    _, harmless = paired_batches()
    loss, parts = repnoise_loss(tiny_lora, harmless, harmless)
    assert not difference_mask(harmless, harmless).any()
    assert parts["noise_loss"].item() == 0.0 and parts["harmful_lens_loss"].item() == 0.0
    assert torch.allclose(loss, parts["harmless_loss"])


def test_other_stages_are_plain_sft(tiny_lora) -> None:
    defense = DEFENSES.get("repnoise")()
    trainer = make_trainer(tiny_lora, defense, stage="finetune")
    defense.setup("finetune", trainer)
    assert defense.harmful is None
    batch = token_batch(4, seed=3)
    stats = defense.training_step("finetune", trainer, batch)
    assert set(stats) == {"loss"}
    assert defense.cache_key("finetune") is None and defense.report("finetune") == {}


# --- options and the pipeline ---------------------------------------------------------------


def test_repnoise_options() -> None:
    cls = DEFENSES.get("repnoise")
    defense = cls()
    # α: None = by the alignment stage's method (0.1 LoRA, 1 full); β as both references
    assert (defense.options.alpha, defense.options.beta) == (None, 0.001)
    assert (defense.resolved_alpha("lora"), defense.resolved_alpha("full")) == (0.1, 1.0)
    assert cls(alpha=0.3).resolved_alpha("full") == 0.3
    assert defense.options.harmful_batch_size is None
    assert cls.needs_provider_harmful and cls.stages == ("alignment",)
    assert cls(alpha=0.1, harmful_batch_size=10).options.harmful_batch_size == 10
    with pytest.raises(ConfigError):
        cls(gamma=1.0)
    with pytest.raises(ConfigError):
        cls(alpha="much")
    with pytest.raises(ConfigError):
        cls(harmful_batch_size=0)


def test_harmful_batch_size_defaults_to_stage_batch(tiny_lora) -> None:
    defense = DEFENSES.get("repnoise")()
    defense.setup("alignment", make_trainer(tiny_lora, defense))
    assert defense.harmful.batch_size == 4
    sized = DEFENSES.get("repnoise")(harmful_batch_size=3)
    sized.setup("alignment", make_trainer(tiny_lora, sized))
    assert sized.harmful.batch_size == 3


def test_repnoise_pipeline_runs(tiny_overrides, tmp_path) -> None:
    from hftlab.context import RunContext
    from hftlab.pipeline import run_pipeline

    config = load_config(None, [*tiny_overrides, "defense=repnoise",
                                "provider_harmful={kind: demo_harmful_qa, n: 16}",
                                "alignment.train.max_steps=2", "finetune.train.max_steps=2"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    info = RunContext(config, tmp_path / "run").stage_info("align")
    assert math.isfinite(info["final_loss"])
    report = info["defense_report"]
    assert report["alpha_used"] == 0.1  # the tiny run aligns a LoRA
    assert all(math.isfinite(report[f"{k}_last"])
               for k in ("harmless_loss", "noise_loss", "harmful_lens_loss"))


def test_reference_settings_pin_the_reference() -> None:
    cls = DEFENSES.get("repnoise")
    options = cls().options_dict()
    # every key resolves: tests/test_defense_settings.py; here the reference values are pinned
    keys = [s.key for s in cls.reference_settings]
    assert len(keys) == len(set(keys))
    assert all(k.split(".", 1)[1] in options for k in keys if k.startswith("defense_args."))
    settings = {s.key: s.reference for s in cls.reference_settings}
    assert (settings["defense_args.alpha"], settings["defense_args.beta"]) == (0.1, 0.001)


# --- the fused logit-lens CE ----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 3, 64])
def test_fused_lens_ce_matches_autograd_of_cross_entropy(chunk) -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    want = F.cross_entropy(rows @ weight.T, targets)
    want_rows, want_weight = torch.autograd.grad(2.5 * want, (rows, weight))

    got = FusedLensCE.apply(rows, weight, targets, chunk)
    got_rows, got_weight = torch.autograd.grad(2.5 * got, (rows, weight))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got_rows, want_rows, atol=1e-6)
    assert torch.allclose(got_weight, want_weight, atol=1e-6)


def test_fused_lens_ce_with_spread_logits_drops_only_underflowing_probabilities() -> None:
    """Logits spread as RepNoise's ascent leaves them (many probabilities below e^-80): the
    loss is exact and the gradient matches autograd's to float32 resolution."""
    g = torch.Generator().manual_seed(6)
    rows = (torch.randn(5, 4, generator=g) * 60).requires_grad_(True)
    weight = torch.randn(40, 4, generator=g)
    targets = torch.randint(0, 40, (5,), generator=g)
    log_probs = torch.log_softmax(rows.detach() @ weight.T, -1)
    assert (log_probs < UNDERFLOW_LOG_PROB).sum() > 20  # the case the cut-off exists for
    want = F.cross_entropy(rows @ weight.T, targets)
    (want_grad,) = torch.autograd.grad(want, rows)
    got = FusedLensCE.apply(rows, weight, targets, 2)
    (got_grad,) = torch.autograd.grad(got, rows)
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(got_grad, want_grad, atol=1e-6, rtol=1e-5)


def test_fused_lens_ce_frozen_weight_and_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g)  # frozen, as the LM head under LoRA
    targets = torch.randint(0, 13, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((rows @ weight.T).float(), targets)
        got = FusedLensCE.apply(rows, weight, targets, 4)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)  # the same bf16 product, float32 softmax
    (grad,) = torch.autograd.grad(got, rows)
    (exact,) = torch.autograd.grad(F.cross_entropy(rows @ weight.T, targets), rows)
    assert grad.dtype == rows.dtype and torch.allclose(grad, exact, atol=2e-2)


def test_lens_falls_back_to_recompute_for_other_heads(tiny_lora) -> None:
    base = tiny_lora.get_base_model()
    head = base.lm_head
    assert fusable_head(head, None) and not fusable_head(head, 30.0)
    harmful, harmless = paired_batches()
    fused, _ = repnoise_loss(tiny_lora, harmful, harmless,
                             generator=torch.Generator().manual_seed(2))
    fused_grads = autograd_of(tiny_lora, fused)
    # a biased head with a zero bias computes the same logits through the unfused path
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
    biased.requires_grad_(False)
    base.lm_head = biased
    try:
        assert not fusable_head(biased, None)
        plain, _ = repnoise_loss(tiny_lora, harmful, harmless,
                                 generator=torch.Generator().manual_seed(2))
        plain_grads = autograd_of(tiny_lora, plain)
    finally:
        base.lm_head = head
    assert torch.allclose(fused, plain, atol=1e-6)
    for name, value in plain_grads.items():
        assert torch.allclose(fused_grads[name], value, atol=1e-6, rtol=1e-5), name
