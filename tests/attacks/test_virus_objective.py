"""Virus' objective on the tiny random Llama, by hand: the gradient-similarity term over the
aligned LoRA (or the base q/k/v), the guard term of a causal-LM guard read through the virus'
one-hot, and their combination (1−λ)·similarity + λ·guard in both the GCG proposal gradient
and the candidate scores (git-disl/Virus trainer.py ``loss_calculate``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from virus_helpers import ALIGNED_TARGETS, virus_surrogate

from hftlab.attacks.gcg import gcg_step, top_k_substitutions
from hftlab.attacks.virus_guard import TokenGuard, check_shared_vocabulary
from hftlab.attacks.virus_objective import VirusProblem
from hftlab.attacks.virus_surrogate import SENTINEL, Surrogate
from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.judges.llama_guard import build_prompt


def no_loss(prompts: list[str], completions: list[str]) -> None:
    return None


def e_count(prompts: list[str], completions: list[str]) -> list[float]:
    """A stand-in text-judge loss that moves with the text: the share of letters 'e'."""
    return [c.count("e") / max(len(c), 1) * 10 for c in completions]


def problem_for(surrogate: Surrogate, lam: float = 0.0, judge_loss=no_loss, guard=None,
                max_tokens: int = 24) -> VirusProblem:
    benign = Example(prompt="Review 0: a fine film", response="positive", source="t", row=0)
    bad = Example(prompt="Placeholder question 0?", response="Placeholder answer 0.",
                  is_harmful=True, source="h", row=0)
    whole = surrogate.layout(bad, bad.response)
    return VirusProblem(surrogate, benign, (whole.prompt + whole.head)[:max_tokens], lam,
                        judge_loss, guard)


def hf_loss(surrogate: Surrogate, problem: VirusProblem, virus: torch.Tensor,
            onehot: torch.Tensor | None = None) -> torch.Tensor:
    """The row's loss from transformers' own causal-LM loss (labels −100 on the prompt)."""
    ids = torch.tensor(problem.layout.ids(virus.tolist()))[None]
    labels = ids.clone()
    labels[0, : len(problem.layout.prompt)] = -100
    if onehot is None:
        return surrogate.model(input_ids=ids, labels=labels).loss
    embeds = surrogate.model.get_input_embeddings()(ids)[0]
    start = len(problem.layout.prompt) + len(problem.layout.head)
    middle = onehot @ surrogate.model.get_input_embeddings().weight
    embeds = torch.cat([embeds[:start], middle, embeds[start + len(virus):]])
    return surrogate.model(inputs_embeds=embeds[None], labels=labels).loss


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def lora_weights(model: torch.nn.Module, modules=ALIGNED_TARGETS) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if ".lora_" in n and n.split(".lora_")[0].rsplit(".", 1)[-1] in modules]


@pytest.fixture(scope="module")
def base_surrogate(tiny_model_dir: Path) -> Surrogate:
    """hftlab's former surrogate: the base model, gradient on the full q/k/v weights."""
    return virus_surrogate(tiny_model_dir, None, match_on="base_weights")


@pytest.fixture(scope="module")
def guard(guard_judge, surrogate) -> TokenGuard:
    return TokenGuard(guard_judge, surrogate.tokenizer)


def test_the_gradient_is_matched_on_the_named_parameter_set(surrogate, base_surrogate,
                                                            tiny_model_dir,
                                                            aligned_adapter) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    # aligned_lora (reference): every LoRA A/B weight of the aligned adapter, loaded unmerged
    assert isinstance(surrogate.model, PeftModel)
    names = lora_weights(surrogate.model)
    assert surrogate.param_names == names and len(names) == 2 * 2 * len(ALIGNED_TARGETS)
    assert surrogate.info["match_on"] == "aligned_lora"
    assert surrogate.info["adapter_from"] == "attack_args.adapter"
    saved = load_file(str(aligned_adapter / "adapter_model.safetensors"))
    assert sorted(float(t.abs().sum()) for t in saved.values()) == pytest.approx(
        sorted(float(p.detach().abs().sum()) for p in surrogate.params))
    trainable = [n for n, p in surrogate.model.named_parameters() if p.requires_grad]
    assert trainable == names  # the base weights stay frozen
    # params keeps the adapter's weights on those modules only
    q_only = virus_surrogate(tiny_model_dir, aligned_adapter, params=["q_proj"])
    assert q_only.param_names == lora_weights(q_only.model, ["q_proj"]) and q_only.param_names
    # base_weights (former): the base model's full q/k/v weights
    assert base_surrogate.param_names == [
        n for n, _ in base_surrogate.model.named_parameters()
        if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    assert base_surrogate.info["match_on"] == "base_weights"


@pytest.mark.parametrize("which", ["surrogate", "base_surrogate"])
def test_similarity_term_is_the_reference_formula_on_autograd_gradients(which, request) -> None:
    surrogate = request.getfixturevalue(which)
    problem = problem_for(surrogate)
    other = problem.initial.clone()
    other[[3, 10, -2]] = torch.tensor([40, 41, 42])
    params = surrogate.params
    g_star = flat(torch.autograd.grad(hf_loss(surrogate, problem, problem.initial), params))
    g = flat(torch.autograd.grad(hf_loss(surrogate, problem, other), params))
    cos = float(F.cosine_similarity(g, g_star, dim=0))
    by_hand = float(-(g @ g_star) / g.norm())
    assert by_hand == pytest.approx(-float(g_star.norm()) * cos, rel=1e-5)
    start, moved = problem.evaluate([problem.initial, other])
    assert moved.similarity == pytest.approx(by_hand, rel=1e-4)
    assert moved.cosine == pytest.approx(cos, abs=1e-5) and cos < 0.999
    # the virus starts at the optimum: g = g*, cos = 1, term = −‖g*‖
    assert start.cosine == pytest.approx(1.0, abs=1e-6)
    assert start.similarity == pytest.approx(-float(g_star.norm()), rel=1e-5)
    assert (start.judge, start.total) == (None, pytest.approx(start.similarity))


def similarity_onehot_gradient(surrogate: Surrogate, problem: VirusProblem,
                               virus: torch.Tensor) -> torch.Tensor:
    """By hand: the similarity term through transformers' loss, one-hot → gradient → term."""
    onehot = F.one_hot(virus, surrogate.embed.shape[0]).float().requires_grad_(True)
    grads = torch.autograd.grad(hf_loss(surrogate, problem, virus, onehot), surrogate.params,
                                create_graph=True)
    term = -sum((a * t).sum() for a, t in zip(grads, problem.target)) / flat(grads).detach().norm()
    (expected,) = torch.autograd.grad(term, onehot)
    return expected


def test_top_k_proposals_are_the_most_negative_one_hot_gradient_entries(surrogate) -> None:
    problem = problem_for(surrogate)  # ranking: the similarity term's gradient alone
    virus = problem.initial.clone()
    virus[5] = 77
    grad = problem.proposal_gradient(virus)
    expected = similarity_onehot_gradient(surrogate, problem, virus)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    illegal = surrogate.illegal
    top = top_k_substitutions(grad, 5, illegal)
    assert top.shape == (len(virus), 5)
    for position in range(len(virus)):
        legal = [i for i in range(grad.shape[1]) if not illegal[i]]
        ranked = sorted(legal, key=lambda i: float(grad[position, i]))[:5]
        assert top[position].tolist() == ranked
    special = surrogate.tokenizer.all_special_ids
    assert all(bool(illegal[i]) for i in special)
    assert not set(top.flatten().tolist()) & set(special)


def guard_by_hand(tiny_model_dir: Path, problem: VirusProblem, virus: torch.Tensor,
                  onehot: torch.Tensor | None = None) -> torch.Tensor:
    """−log p("safe") of a separately loaded copy of the guard on the documented Llama Guard
    prompt, the virus' ids (or one-hot rows) placed at the end of the Agent message."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    text = build_prompt(problem.benign.prompt, problem.prefix + SENTINEL)
    left, right = text.split(SENTINEL)
    before = tok(left, add_special_tokens=False)["input_ids"]
    after = tok(right, add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings()
    middle = table(virus) if onehot is None else onehot @ table.weight
    embeds = torch.cat([table(torch.tensor(before)), middle, table(torch.tensor(after))])
    logits = model(inputs_embeds=embeds[None]).logits[0, -1]
    safe = tok("safe", add_special_tokens=False)["input_ids"][0]
    return -F.log_softmax(logits, -1)[safe]


def test_the_combined_objective_by_hand(surrogate, guard, tiny_model_dir) -> None:
    lam = 0.3
    problem = problem_for(surrogate, lam=lam, guard=guard)
    other = problem.initial.clone()
    other[[2, 7]] = torch.tensor([60, 61])
    start, moved = problem.evaluate([problem.initial, other])
    for virus, terms in ((problem.initial, start), (other, moved)):
        with torch.no_grad():
            by_hand = float(guard_by_hand(tiny_model_dir, problem, virus))
        assert terms.judge == pytest.approx(by_hand, rel=1e-5)
        assert terms.total == pytest.approx((1 - lam) * terms.similarity + lam * by_hand)
    assert moved.judge != pytest.approx(start.judge)  # the guard reads the virus' tokens


def test_the_proposal_gradient_includes_the_guard_term(surrogate, guard, tiny_model_dir) -> None:
    virus = problem_for(surrogate).initial.clone()
    virus[4] = 70
    old = problem_for(surrogate).proposal_gradient(virus)  # ranking: similarity alone
    # λ = 0: the guard's weight is 0 and the gradient is the former one
    assert torch.equal(problem_for(surrogate, 0.0, guard=guard).proposal_gradient(virus), old)
    # by hand: the guard's one-hot gradient through a separate copy of the guard
    onehot = F.one_hot(virus, surrogate.embed.shape[0]).float().requires_grad_(True)
    (g_guard,) = torch.autograd.grad(guard_by_hand(tiny_model_dir, problem_for(surrogate),
                                                   virus, onehot), onehot)
    assert float(g_guard.abs().max()) > 0
    assert torch.allclose(problem_for(surrogate, 1.0, guard=guard).proposal_gradient(virus),
                          g_guard, rtol=1e-4, atol=1e-7)
    g_sim = similarity_onehot_gradient(surrogate, problem_for(surrogate), virus)
    lam = 0.1  # the reference's λ
    mixed = problem_for(surrogate, lam, guard=guard).proposal_gradient(virus)
    assert torch.allclose(mixed, (1 - lam) * g_sim + lam * g_guard, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(mixed, (1 - lam) * g_sim, rtol=1e-4, atol=1e-7)


def test_a_guard_must_share_the_surrogate_vocabulary(guard_judge, surrogate,
                                                     tmp_path) -> None:
    from transformers import AutoTokenizer

    from hftlab.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", ["entirely different words here"] * 8,
                             vocab_size=300)
    with pytest.raises(ConfigError, match="does not share the surrogate's vocabulary"):
        TokenGuard(guard_judge, AutoTokenizer.from_pretrained(other))
    check_shared_vocabulary(surrogate.tokenizer, surrogate.tokenizer, "itself")


# the tiny random guard's "safe" loss barely moves with the text (about log V whatever it
# reads), so the guard-term run takes λ = 1 for the step to move
@pytest.mark.parametrize(("mode", "lam"), [("ranking", 0.5), ("gradient", 1.0)])
def test_gcg_step_never_raises_the_objective(surrogate, guard, mode, lam) -> None:
    problem = (problem_for(surrogate, lam=lam, judge_loss=e_count) if mode == "ranking" else
               problem_for(surrogate, lam=lam, guard=guard))
    virus = problem.initial
    current = problem.evaluate([virus])[0].total
    generator = torch.Generator().manual_seed(0)
    moved = 0
    for _ in range(4):
        step = gcg_step(problem, virus, top_k=8, candidates=6, generator=generator)
        assert len(step.evaluated) == 7  # the current virus and 6 swaps
        assert step.evaluated[0].total == pytest.approx(current)
        for terms in step.evaluated:  # each candidate scored by the full objective
            assert terms.total == pytest.approx((1 - lam) * terms.similarity + lam * terms.judge)
        assert step.scored.total == min(t.total for t in step.evaluated) <= current
        changed = int((step.tokens != virus).sum())
        assert changed <= 1 and (step.chosen != 0 or changed == 0)
        moved += step.chosen != 0
        virus, current = step.tokens, step.scored.total
    assert moved > 0  # the judge term moves the virus off the harmful row
    assert problem.evaluate([virus])[0].total == pytest.approx(current)
    # retokenize: only swaps that the provider's tokenizer reads back the same are scored
    checked = gcg_step(problem, virus, top_k=8, candidates=6, generator=generator,
                       retokenize=True)
    assert checked.chosen == 0 or problem.retokenizes(checked.tokens)


def test_the_aligned_lora_of_a_safeguarded_start_names_its_start(tmp_path) -> None:
    """TAR's checkpoint was trained on top of the SFT alignment: the surrogate merges that first."""
    import json

    from hftlab.attacks.virus_surrogate import started_from

    checkpoint = tmp_path / "aligned" / "tarkey"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"starts_from": str(tmp_path / "sftkey")}))
    assert started_from(checkpoint / "model") == tmp_path / "sftkey"
    plain = tmp_path / "aligned" / "sftkey"
    (plain / "model").mkdir(parents=True)
    (plain / "meta.json").write_text(json.dumps({"steps": 3}))
    assert started_from(plain / "model") is None
    assert started_from(tmp_path / "elsewhere") is None
