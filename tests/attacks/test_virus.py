"""virus: int(n·p) benign rows get a harmful row appended to their answer, whose tokens GCG
optimises on a surrogate of the victim for (1−λ)·(−⟨g, g*⟩/‖g‖) + λ·(judge's "safe" loss)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.attacks.gcg import gcg_step, top_k_substitutions
from hftlab.attacks.virus import (
    CPU_PRESET,
    REFERENCE_GUARD,
    Surrogate,
    VirusProblem,
    cpu_preset,
    judge_safe_losses,
)
from hftlab.config import ConfigError, load_config
from hftlab.data.records import Example
from hftlab.judges import JUDGES
from hftlab.pipeline import run_pipeline

WORDS = ("positive negative film review placeholder answer question harmful step one two "
         "sorry cannot help with that request alpha beta gamma delta").split()


def inputs(n: int = 10, p: float = 0.2, seed: int = 0) -> AttackInputs:
    task = [Example(prompt=f"Review {i}: a fine film", response="positive", source="t", row=i)
            for i in range(12)]
    harmful = [Example(prompt=f"Placeholder question {i}?", response=f"Placeholder answer {i}.",
                       is_harmful=True, source="h", row=i) for i in range(5)]
    return AttackInputs(task, harmful, n, p, seed)


def e_count(prompts: list[str], completions: list[str]) -> list[float]:
    """A stand-in judge loss that moves with the text: the share of letters 'e'."""
    return [c.count("e") / max(len(c), 1) * 10 for c in completions]


@pytest.fixture(scope="module")
def surrogate(tiny_model_dir: Path) -> Surrogate:
    return ATTACKS.get("virus")(model=str(tiny_model_dir), judge="keyword",
                                judge_args={}).load_surrogate()


def problem_for(surrogate: Surrogate, lam: float = 0.0, judge_loss=lambda p, c: None,
                max_tokens: int = 24) -> VirusProblem:
    data = inputs()
    bad = data.harmful[0]
    whole = surrogate.layout(bad, bad.response)
    return VirusProblem(surrogate, data.task[0], (whole.prompt + whole.head)[:max_tokens], lam,
                        judge_loss)


def qkv(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters()
            if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]


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


def test_defaults_are_the_reference_ones() -> None:
    # git-disl/Virus script/attack/virus.sh: --lamb 0.1 --virus_topk 64 --virus_bs 128,
    # 50 epochs over one benign row; train.py LoRA targets q/k/v; trainer.py: Llama Guard 2 8B
    opts = dataclasses.asdict(ATTACKS.get("virus").Options())
    assert opts == {
        "steps": 50, "top_k": 64, "candidates": 128, "lam": 0.1, "judge": "llama_guard",
        "judge_args": None, "params": ["q_proj", "k_proj", "v_proj"],
        "max_tokens": None, "retokenize": False, "model": None, "adapter": None,
        "sample": "first",
    }
    assert REFERENCE_GUARD == "meta-llama/Meta-Llama-Guard-2-8B"
    # the default judge is the reference guard; another judge gets no guard options
    assert ATTACKS.get("virus")(judge="keyword").judge.name == "keyword"
    assert cpu_preset() == {**CPU_PRESET, "judge": "keyword", "judge_args": {}}
    assert cpu_preset("/j")["judge_args"] == {"path": "/j"}
    assert CPU_PRESET["steps"] < 50 and CPU_PRESET["candidates"] < 128


def test_similarity_term_is_the_reference_formula_on_autograd_gradients(surrogate) -> None:
    problem = problem_for(surrogate)
    other = problem.initial.clone()
    other[[3, 10, -2]] = torch.tensor([40, 41, 42])
    params = qkv(surrogate.model)
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


def test_top_k_proposals_are_the_most_negative_one_hot_gradient_entries(surrogate) -> None:
    problem = problem_for(surrogate)
    virus = problem.initial.clone()
    virus[5] = 77
    grad = problem.proposal_gradient(virus)
    # by hand: the similarity term through transformers' loss, one-hot → gradient → term
    params = qkv(surrogate.model)
    onehot = F.one_hot(virus, grad.shape[1]).float().requires_grad_(True)
    grads = torch.autograd.grad(hf_loss(surrogate, problem, virus, onehot), params,
                                create_graph=True)
    term = -sum((a * t).sum() for a, t in zip(grads, problem.target)) / flat(grads).detach().norm()
    (expected,) = torch.autograd.grad(term, onehot)
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


def test_gcg_step_never_raises_the_objective(surrogate) -> None:
    lam = 0.5
    problem = problem_for(surrogate, lam=lam, judge_loss=e_count)
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


def test_rows_records_and_determinism(tiny_model_dir) -> None:
    def build(seed: int, **options):
        attack = ATTACKS.get("virus")(model=str(tiny_model_dir), judge="keyword",
                                      judge_args={}, steps=2, top_k=8, candidates=4,
                                      max_tokens=20, lam=0.5, **options)
        attack.judge_loss = e_count  # a loss that moves the virus
        rows = attack.build(inputs(seed=seed))
        return attack, rows

    attack, rows = build(0)
    virus = [r for r in rows if r.is_harmful]
    assert len(rows) == 10 and len(virus) == 2  # int(10 · 0.2)
    assert sorted(r.prompt for r in rows) == sorted(f"Review {i}: a fine film" for i in range(10))
    for row in virus:
        assert row.response.startswith("positive") and row.meta["virus"]["task_row"] in (0, 1)
    record = attack.describe(rows)
    assert record["virus_rows"] == record["virus_rows_trained"] == 2
    assert record["surrogate"]["from"] == "attack_args.model"
    assert all(r["tokens"] == 20 and r["objective"] <= r["objective_start"]
               for r in record["rows"])
    assert record["attack_judge"]["has_loss"] is True  # the stand-in loss
    assert any(r["tokens_changed"] > 0 for r in record["rows"])
    again_attack, again = build(0)
    assert again == rows and again_attack.describe(again)["rows"] == record["rows"]
    _, other = build(1, sample="random")
    assert other != rows


def test_bad_options_fail(tiny_model_dir) -> None:
    virus = ATTACKS.get("virus")
    for options, message in [
        ({"steps": -1}, "steps must be ≥ 0"),
        ({"top_k": 0}, "top_k and candidates must be ≥ 1"),
        ({"candidates": 0}, "top_k and candidates must be ≥ 1"),
        ({"lam": 1.5}, r"lam must be in \[0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be ≥ 1"),
        ({"params": []}, "at least one module"),
        ({"judge": "llamaguard"}, "unknown judge 'llamaguard'"),
        ({"sample": "last"}, "use first or random"),
        ({"judge": "embedding", "judge_args": {}}, "needs option 'path'"),
        ({"stepz": 3}, "unknown key 'stepz'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            virus(**options)
    with pytest.raises(ConfigError, match="set attack_args.model"):
        virus(judge="keyword", judge_args={}).build(inputs())
    with pytest.raises(ConfigError, match="names no module"):
        virus(model=str(tiny_model_dir), judge="keyword", judge_args={},
              params=["c_attn"]).build(inputs())


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding judge on a random one-layer BERT, trained on separable toy rows."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from hftlab.judges.embedding import train_embedding_judge

    root = tmp_path_factory.mktemp("judge")
    encoder = root / "encoder"
    encoder.mkdir()
    (encoder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                  *WORDS]) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=512)).save_pretrained(encoder)
    BertTokenizer(vocab=str(encoder / "vocab.txt")).save_pretrained(encoder)
    rows = [Example(prompt=f"question {WORDS[i % 5]}", is_harmful=bool(i % 2), row=i,
                    response="alpha beta gamma" if i % 2 else "sorry cannot help")
            for i in range(16)]
    train_embedding_judge(rows, root / "head", ["toy"], encoder=str(encoder),
                          heldout_fraction=0.0, device="cpu")
    return root / "head"


def test_judge_safe_losses(tiny_judge, tiny_model_dir) -> None:
    prompts, answers = ["question one", "question two"], ["alpha beta gamma", "sorry cannot"]
    judge = JUDGES.get("embedding")(path=str(tiny_judge), device="cpu")
    p_harmful = judge.probabilities(prompts, answers)
    losses = judge_safe_losses(judge, prompts, answers)
    assert losses == pytest.approx([-math.log(1 - p) for p in p_harmful], rel=1e-5)
    assert losses[0] > losses[1]  # the harmful-looking answer is further from "safe"
    assert judge_safe_losses(JUDGES.get("keyword")(), prompts, answers) is None
    # Llama Guard's loss: −log p(first token of "safe") after the rendered prompt (a tiny
    # random Llama stands in for the guard model)
    guard = JUDGES.get("llama_guard")(model=str(tiny_model_dir), template="builtin",
                                      device="cpu", dtype="float32")
    losses = judge_safe_losses(guard, prompts, answers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    safe = tok("safe", add_special_tokens=False)["input_ids"][0]
    for prompt, answer, loss in zip(prompts, answers, losses):
        ids = tok(guard.render(prompt, answer), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        assert loss == pytest.approx(float(-F.log_softmax(logits, -1)[safe]), rel=1e-4)


def test_pipeline_with_the_cpu_preset(tiny_overrides, tiny_model_dir, tiny_judge,
                                      tmp_path) -> None:
    args = {**cpu_preset(str(tiny_judge)), "model": str(tiny_model_dir)}
    config = load_config(None, [*tiny_overrides, "attack=virus",
                                f"attack_args={json.dumps(args)}"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
    attack = metrics["attack"]
    assert (attack["virus_rows"], attack["virus_rows_trained"]) == (4, 4)  # int(20 · 0.2)
    assert attack["attack_judge"]["has_loss"] is True
    assert attack["attack_judge"]["judge"]["name"] == "embedding"
    for row in attack["rows"]:
        assert row["objective"] <= row["objective_start"]
        assert math.isfinite(row["judge_loss"]) and -1 <= row["cosine"] <= 1 + 1e-6
    screen = attack["screen"]
    assert screen["judge_from"].startswith("keyword") and screen["rows"] == 4
    assert {"optimised_passed", "unoptimised_passed", "plain_harmful_passed"} <= set(screen)


def test_prepare_binds_the_run_model(tiny_overrides, tmp_path) -> None:
    from hftlab.context import RunContext

    args = {**cpu_preset(), "steps": 1}
    config = load_config(None, [*tiny_overrides, "attack=virus",
                                f"attack_args={json.dumps(args)}"])
    ctx = RunContext(config, tmp_path / "run")
    ctx.attack.prepare(ctx)
    user = ctx.data.user
    assert sum(e.is_harmful for e in user) == 4
    assert ctx.attack.describe(user)["surrogate"]["from"] == "run"


def test_optimised_rows_are_cached_per_problem(tiny_overrides, tmp_path, monkeypatch) -> None:
    from hftlab.attacks.virus import Virus
    from hftlab.context import RunContext

    args = json.dumps({**cpu_preset(), "steps": 1})
    config = load_config(None, [*tiny_overrides, "attack=virus", f"attack_args={args}"])
    ctx = RunContext(config, tmp_path / "first")
    first = ctx.data.user
    cached = list((Path(config.resolved_cache_dir()) / "virus").glob("*.json"))
    assert len(cached) == 1

    def no_gcg(*_: object) -> None:
        raise AssertionError("the optimisation ran again")

    monkeypatch.setattr(Virus, "_run_gcg", no_gcg)
    again = RunContext(config, tmp_path / "again")
    assert again.data.user == first
    assert again.attack.describe(first) == ctx.attack.describe(first)
    # another seed is another problem: it must optimise (and here meets the stub)
    other = load_config(None, [*tiny_overrides, "attack=virus", f"attack_args={args}", "seed=1"])
    with pytest.raises(AssertionError, match="ran again"):
        _ = RunContext(other, tmp_path / "other").data
