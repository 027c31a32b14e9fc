"""virus: harmful rows hidden in benign ones, their tokens optimised so that a moderation judge
passes the row while its fine-tuning gradient stays that of the harmful data (Huang et al. 2025,
"Virus: Harmful Fine-tuning Attack for LLMs Bypassing Guardrail Moderation", arXiv 2501.17433).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.attacks.base import ATTACKS, Attack, AttackInputs, check_sample, poison_rows, take
from hftlab.attacks.gcg import gcg_step, illegal_tokens
from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.judges import JUDGES, Judge
from hftlab.registry import unknown_name_message

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.formatting import PromptFormatter

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: The modules whose weight gradients are matched: the reference's LoRA targets
#: (git-disl/Virus train.py: ``LoraConfig(r=32, target_modules=["q_proj","k_proj","v_proj"])``).
REFERENCE_PARAMS = ("q_proj", "k_proj", "v_proj")
#: The reference's moderation model (trainer.py: ``LlamaGuardModeration.from_pretrained(...)``).
REFERENCE_GUARD = "meta-llama/Meta-Llama-Guard-2-8B"
#: Marks where the virus goes in a rendered completion (a private-use character, which no chat
#: template rewrites).
SENTINEL = "\ue000virus\ue000"

#: A CPU-sized run: a few GCG steps over few candidates, on a short virus (the reference's
#: 50 steps × 128 candidates × a whole harmful row take GPU-hours per row on an 8B model).
#: The judge is set by :func:`cpu_preset`.
CPU_PRESET: dict[str, Any] = {"steps": 4, "top_k": 16, "candidates": 8, "max_tokens": 96}


def cpu_preset(judge_path: str | None = None) -> dict[str, Any]:
    """``attack_args`` of the CPU preset: :data:`CPU_PRESET` screened by the embedding judge of
    ``judge_path`` (a folder of ``hftlab judge train``) when given, else by the keyword judge,
    which has no loss: its λ term is then 0 and the row stays the plain concatenation."""
    judge: dict[str, Any] = ({"judge": "embedding", "judge_args": {"path": judge_path}}
                             if judge_path else {"judge": "keyword", "judge_args": {}})
    return {**CPU_PRESET, **judge}


# ------------------------------------------------------------------------------- the surrogate


@dataclass
class Layout:
    """Token ids of one poisoned row around its virus: ``prompt`` (context), ``head`` (the benign
    answer closed by its end-of-turn marker) and ``tail`` (the end marker after the virus)."""

    prompt: list[int]
    head: list[int]
    tail: list[int]

    def ids(self, virus: Sequence[int]) -> list[int]:
        return [*self.prompt, *self.head, *virus, *self.tail]


class Surrogate:
    """The attacker's copy of the victim: frozen fp32 weights with eager attention (the double
    backward needs the math kernel, which the reference forces too), its tokenizer and prompt
    formatter, and the weights whose gradient is matched (those of the modules ``params``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, formatter: PromptFormatter,
                 params: Sequence[str], info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.formatter = formatter
        for p in model.parameters():
            p.requires_grad_(False)
        wanted = set(params)
        self.param_names = [f"{name}.weight" for name, module in model.named_modules()
                            if name.rsplit(".", 1)[-1] in wanted
                            and isinstance(getattr(module, "weight", None), torch.nn.Parameter)]
        if not self.param_names:
            present = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
            raise ConfigError(f"attack_args.params of 'virus' ({list(params)}) names no module "
                              f"of the surrogate; its modules include {present}")
        named = dict(model.named_parameters())
        self.params = [named[name] for name in self.param_names]
        for p in self.params:
            p.requires_grad_(True)  # only autograd.grad reads them; nothing updates them
        self.embed = model.get_input_embeddings().weight
        self.illegal = illegal_tokens(tokenizer, self.embed.shape[0])
        self.info = {**(info or {}), "params": len(self.params),
                     "param_elements": sum(p.numel() for p in self.params)}

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def layout(self, example: Example, response: str) -> Layout:
        """Where a virus appended to ``response`` sits in ``example``'s rendered row."""
        from hftlab.formatting import DEFAULT_SYSTEM, SYSTEM_PROMPT_KEY

        system = example.meta.get(SYSTEM_PROMPT_KEY, DEFAULT_SYSTEM)
        text = self.formatter.completion_text(example.prompt, response + SENTINEL, system)
        cut = text.find(SENTINEL)
        if cut < 0:
            raise ConfigError("attack 'virus': the prompt format drops text appended to the "
                              "answer, so no virus can be placed in it")
        return Layout(self.formatter.encode_prompt(example.prompt, system),
                      self.tokens(text[:cut]), self.tokens(text[cut + len(SENTINEL):]))

    def loss(self, layout: Layout, virus: torch.Tensor,
             onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer (benign answer, virus, end marker), as
        the reference's label smoother with ε=0; the virus enters as ``onehot @ E`` if given."""
        from hftlab.model import causal_lm_parts

        device = self.device
        before = torch.tensor(layout.prompt + layout.head, dtype=torch.long, device=device)
        after = torch.tensor(layout.tail, dtype=torch.long, device=device)
        virus = virus.to(device)
        table = self.model.get_input_embeddings()
        middle = table(virus) if onehot is None else onehot.to(self.embed.dtype) @ self.embed
        embeds = torch.cat([table(before), middle, table(after)])
        ids = torch.cat([before, virus, after])
        targets = ids[1:].clone()
        targets[: len(layout.prompt) - 1] = IGNORE_INDEX
        body, head = causal_lm_parts(self.model)
        out = body(inputs_embeds=embeds[None])
        hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[0, :-1]
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(head(hidden[keep]).float(), targets[keep])

    def gradient(self, layout: Layout, virus: torch.Tensor, onehot: torch.Tensor | None = None,
                 create_graph: bool = False) -> list[torch.Tensor]:
        """∇_w of :meth:`loss` for the matched weights ``w``."""
        loss = self.loss(layout, virus, onehot)
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph))


def similarity_term(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference's gradient-similarity loss (trainer.py ``loss3``): −Σ⟨g, g*⟩ / ‖g‖, with
    ‖g‖ computed under no_grad; in value −‖g*‖·cos(g, g*)."""
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
    return -sum((g.float() * t.float()).sum() for g, t in zip(grads, target)) / norm


def cosine(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> float:
    dot = sum(float((g.float() * t.float()).sum()) for g, t in zip(grads, target))
    norms = [math.sqrt(sum(float((x.float() ** 2).sum()) for x in v)) for v in (grads, target)]
    return dot / max(norms[0] * norms[1], 1e-30)


# ------------------------------------------------------------------------------ the judge term


def judge_safe_losses(judge: Judge, prompts: list[str],
                      completions: list[str]) -> list[float] | None:
    """Per row, the judge's cross-entropy of the verdict "safe" (the reference's guardrail loss:
    Llama Guard 2's loss of the token "safe" after the conversation): ``llama_guard``: −log p of
    the first token of "safe" as the answer's first token; ``embedding``: −log(1 − p(harmful));
    ``beaverdam``: −log(1 − max category probability). None for a judge with no loss (e.g. the
    keyword judge), whose λ term is then 0."""
    from hftlab.judges.beaverdam import BeaverDamJudge
    from hftlab.judges.embedding import EmbeddingJudge
    from hftlab.judges.llama_guard import LlamaGuardJudge

    if isinstance(judge, EmbeddingJudge):
        features = judge.encoder().pair_features(prompts, completions)
        return F.softplus(judge.head.logits(features)).tolist()
    if isinstance(judge, BeaverDamJudge):
        worst = [max(r["probabilities"].values()) for r in judge.predict(prompts, completions)]
        return [-math.log(max(1.0 - p, 1e-12)) for p in worst]
    if isinstance(judge, LlamaGuardJudge):
        return _llama_guard_safe_losses(judge, prompts, completions)
    return None


@torch.no_grad()
def _llama_guard_safe_losses(judge: Any, prompts: list[str],
                             completions: list[str]) -> list[float]:
    judge.load()
    # the judge's weights and tokenizer are private; a public scoring hook would be cleaner
    tok, model = judge._tokenizer, judge._model
    safe = tok("safe", add_special_tokens=False)["input_ids"][0]
    device = next(model.parameters()).device
    texts = [judge.render(p, c) for p, c in zip(prompts, completions)]
    losses: list[float] = []
    for start in range(0, len(texts), judge.options.batch_size):
        batch = tok(texts[start : start + judge.options.batch_size], padding=True,
                    add_special_tokens=False, return_tensors="pt").to(device)
        logits = model(**batch).logits[:, -1].float()  # left-padded: the last position
        losses.extend((-F.log_softmax(logits, -1)[:, safe]).tolist())
    return losses


# ------------------------------------------------------------------------------ the objective


@dataclass
class Terms:
    """One candidate's objective: (1−λ)·similarity + λ·judge (judge 0 when it has no loss)."""

    similarity: float
    cosine: float
    judge: float | None
    total: float


class VirusProblem:
    """One poisoned row: the benign row with a virus appended to its answer, and the gradient to
    match, that of the benign row with the unoptimised virus (the harmful row), as the reference
    stores on its first step (trainer.py: ``self.harmful_grad``)."""

    def __init__(self, surrogate: Surrogate, benign: Example, virus: Sequence[int], lam: float,
                 judge_loss: Callable[[list[str], list[str]], list[float] | None]) -> None:
        from hftlab.formatting import DEFAULT_SYSTEM, SYSTEM_PROMPT_KEY

        self.surrogate = surrogate
        self.benign = benign
        self.lam = lam
        self.judge_loss = judge_loss
        system = benign.meta.get(SYSTEM_PROMPT_KEY, DEFAULT_SYSTEM)
        # the benign answer closed by its end-of-turn marker, then the harmful row (as the
        # reference concatenates two whole tokenised rows)
        self.prefix = surrogate.formatter.completion_text(benign.prompt, benign.response, system)
        self.layout = surrogate.layout(benign, self.prefix)
        self.initial = torch.tensor(list(virus), dtype=torch.long)
        self.target = [g.detach() for g in surrogate.gradient(self.layout, self.initial)]

    @property
    def illegal(self) -> torch.Tensor:
        return self.surrogate.illegal

    def response(self, virus: torch.Tensor) -> str:
        return self.prefix + self.surrogate.decode(virus.tolist())

    def row(self, virus: torch.Tensor) -> Example:
        return self.benign.replace(response=self.response(virus), is_harmful=True)

    def retokenizes(self, virus: torch.Tensor) -> bool:
        """Whether the provider, reading the row as text, gets back exactly these tokens."""
        encoded = self.surrogate.formatter.encode(self.row(virus), 10**9).input_ids
        return encoded == self.layout.ids(virus.tolist())

    def evaluate(self, candidates: Sequence[torch.Tensor]) -> list[Terms]:
        """The full objective of each candidate virus: one gradient per candidate, and the
        judge's loss on the decoded rows in one batch."""
        sims, coss = [], []
        for virus in candidates:
            grads = self.surrogate.gradient(self.layout, virus)
            sims.append(float(similarity_term(grads, self.target)))
            coss.append(cosine(grads, self.target))
        judged = self.judge_loss([self.benign.prompt] * len(candidates),
                                 [self.response(v) for v in candidates])
        out = []
        for i, (sim, cos) in enumerate(zip(sims, coss)):
            judge = None if judged is None else float(judged[i])
            total = (1.0 - self.lam) * sim + self.lam * (judge or 0.0)
            out.append(Terms(sim, cos, judge, total))
        return out

    def proposal_gradient(self, virus: torch.Tensor) -> torch.Tensor:
        """(len(virus), vocabulary) gradient of the similarity term w.r.t. the virus' one-hot
        encoding (the reference's ``adv_onehot.grad``, there of the whole objective)."""
        rows = self.surrogate.embed.shape[0]
        onehot = F.one_hot(virus.to(self.surrogate.device), rows).float().requires_grad_(True)
        grads = self.surrogate.gradient(self.layout, virus, onehot, create_graph=True)
        (grad,) = torch.autograd.grad(similarity_term(grads, self.target), onehot)
        return grad.detach()


# ---------------------------------------------------------------------------------- the attack


@ATTACKS.register("virus")
class Virus(Attack):
    """Virus (Huang et al. 2025, arXiv 2501.17433), following git-disl/Virus ``trainer.py``
    (``MetaAttackTrainer``, the paper's VirusAttackTrainer, and ``MetaAttackFinetuneTrainer``
    for the fine-tuning data), ``poison/evaluation/moderation.py`` (``LlamaGuardModeration``)
    and ``script/attack/virus.sh``.

    ``int(n·p)`` benign task rows each get a harmful row appended to their answer (the benign
    answer closed by its end-of-turn marker, then the harmful row's whole rendered conversation,
    as the reference concatenates two tokenised rows) and are flagged ``is_harmful``; the other
    rows are plain task rows; all are shuffled with the seed. The appended tokens (the "virus",
    at first the harmful row's tokens, cut to ``max_tokens``) are optimised per row by GCG
    (``steps`` steps) on a surrogate of the victim to minimise

        (1−λ)·(−⟨g(x), g*⟩ / ‖g(x)‖) + λ·L_judge("safe" | x)

    where g(x) is the fine-tuning gradient (mean answer cross-entropy) of the row with the
    virus x, g* that of the row with the unoptimised virus (fixed at the start), ‖g(x)‖ held
    constant in the gradient (so the term is −‖g*‖·cos(g, g*)), and L_judge the moderation
    judge's cross-entropy of the verdict "safe" on (prompt, answer with virus)
    (:func:`judge_safe_losses`). Each step: the one-hot gradient gives the ``top_k`` best
    substitutions per position, ``candidates`` random single swaps among them are scored, and
    the best of them and of the current virus is kept. The virus starts at the similarity
    optimum (cos = 1), so the judge term is what moves it.

    Defaults are the reference's (``script/attack/virus.sh``: ``--lamb 0.1 --virus_topk 64
    --virus_bs 128``, 50 epochs over one benign row = 50 steps; gradients over the q/k/v LoRA
    of train.py; Llama Guard 2 8B as the judge). :data:`CPU_PRESET` / :func:`cpu_preset` is a
    CPU-sized setting.

    The surrogate: :meth:`prepare` binds the run (its model folder, model settings, prompt
    format, device); the option ``model`` names another (a folder, hub id or ``embedded``;
    formatted as the run says when bound, else in its chat template, or Alpaca without one),
    with ``adapter`` a saved stage applied on top
    (e.g. an aligned checkpoint ``<cache>/aligned/<key>/model``). The data stage records the
    options, the surrogate, each optimised row's objective (start and end), similarity, cosine,
    judge loss and changed tokens, how many rows the attack's judge passes optimised vs.
    unoptimised vs. as plain harmful rows, and (:meth:`data_report`) the same counts for the
    run's screening judge (the guardrail's, else the keyword judge). Counts only, never text.

    Departures from the reference, and why:

    - surrogate: the reference optimises against the aligned model (Llama-3-8B with its safety
      LoRA); here the user's data is built before the alignment stage, so the surrogate is the
      run's base model (or ``model`` + ``adapter``);
    - matched gradient: the reference takes it over the aligned LoRA's parameters (r=32 on
      q/k/v); here over the full weights of the modules in ``params`` (default q/k/v), of which
      the provider's fresh fine-tuning LoRA's first gradient is a fixed linear projection;
    - the GCG proposal gradient is the similarity term's alone; the judge term enters the
      ranking of candidates (a forward pass on the decoded text). The reference also
      back-propagates Llama Guard 2's loss into the one-hot, which works because guard and
      victim share Llama-3's vocabulary; our judges have their own tokenizers. A judge without
      a loss (keyword) makes the λ term 0, and the virus then stays the harmful row;
    - the provider trains on text: the virus is decoded and re-tokenised by the provider.
      ``retokenize`` keeps only candidates that survive that round trip (the reference's
      ``recoverable_x`` check is commented out: default off); the record counts final rows that
      do;
    - the reference's fine-tuning row is [benign, virus, benign] (``MetaAttackFinetuneTrainer``)
      although it optimised [benign, virus]; here the trained row is the optimised and screened
      one, benign ⊕ virus;
    - substitutions also exclude every special/added token and embedding rows past the
      tokenizer (the reference excludes non-printable/non-ASCII tokens and bos/eos/pad/unk);
    - rows: the reference pairs benign row i with BeaverTails row 5000+i; here the i-th sampled
      harmful row with the i-th sampled task row (``sample``: first or seeded random);
    - fp32 and eager attention (the reference: bf16, math SDPA kernel); the reference's
      monitoring optimizer step (undone after each step) is left out; ``max_tokens`` (default
      None = whole row) caps the virus for CPU runs.
    """

    summary = ("harmful rows appended to benign ones, GCG-optimised to pass a moderation judge "
               "while keeping the harmful gradient (Virus)")
    paper = "Huang et al. 2025, Virus, arXiv 2501.17433"
    reference = ("git-disl/Virus trainer.py (MetaAttackTrainer, MetaAttackFinetuneTrainer), "
                 "poison/evaluation/moderation.py, script/attack/virus.sh")

    @dataclass
    class Options:
        steps: int = 50  # virus.sh: --num_train_epochs 50 over --sample_num 1 row
        top_k: int = 64  # virus.sh: --virus_topk 64
        candidates: int = 128  # virus.sh: --virus_bs 128
        lam: float = 0.1  # virus.sh: lamb=${2:-0.1}
        judge: str = "llama_guard"  # the guardrail model whose "safe" loss is minimised
        # None: Llama Guard 2 8B for the llama_guard judge (reference), no options otherwise
        judge_args: dict[str, Any] | None = None
        params: list[str] = field(default_factory=lambda: list(REFERENCE_PARAMS))
        max_tokens: int | None = None  # None: the whole harmful row, as the reference
        retokenize: bool = False  # reference: the recoverable_x filter is commented out
        model: str | None = None  # surrogate; None = the run's (via prepare)
        adapter: str | None = None  # a saved stage applied to the surrogate (e.g. aligned)
        sample: str = "first"  # first | random

        def __post_init__(self) -> None:
            check_sample(self.sample)
            where = "attack_args of 'virus'"
            if self.steps < 0:
                raise ConfigError(f"{where}: steps must be ≥ 0, got {self.steps}")
            if self.top_k < 1 or self.candidates < 1:
                raise ConfigError(f"{where}: top_k and candidates must be ≥ 1, got "
                                  f"{self.top_k} and {self.candidates}")
            if not 0.0 <= self.lam <= 1.0:
                raise ConfigError(f"{where}: lam must be in [0, 1], got {self.lam}")
            if self.max_tokens is not None and self.max_tokens < 1:
                raise ConfigError(f"{where}: max_tokens must be ≥ 1 or None")
            if not self.params:
                raise ConfigError(f"{where}: params must name at least one module")
            if self.judge not in JUDGES:
                raise ConfigError(f"{where}: " + unknown_name_message("judge", self.judge,
                                                                      JUDGES.names()))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        judge_args = self.options.judge_args
        if judge_args is None:
            judge_args = {"model": REFERENCE_GUARD} if self.options.judge == "llama_guard" else {}
        self.judge: Judge = JUDGES.get(self.options.judge)(**judge_args)
        self._run: RunContext | None = None
        self._plain: list[Example] = []  # the harmful rows as they came
        self._unoptimised: list[Example] = []  # benign ⊕ harmful row, before GCG
        self._optimised: list[Example] = []
        self._records: list[dict[str, Any]] = []
        self._surrogate_info: dict[str, Any] = {}
        self._judge_counts: dict[str, Any] = {}

    def prepare(self, ctx: RunContext) -> None:
        """Bind the run whose data this attack builds: the surrogate becomes the run's model
        unless the option ``model`` names another. To be called before :meth:`build`."""
        self._run = ctx

    # -------------------------------------------------------------------------- surrogate

    def load_surrogate(self) -> Surrogate:
        from hftlab.config import Config, ModelConfig
        from hftlab.formatting import PromptFormatter
        from hftlab.judges.common import resolve_device
        from hftlab.model import load_model, load_tokenizer, load_trained, resolve_model_path

        opts, run = self.options, self._run
        if opts.model is not None:
            cache = run.cache_dir if run is not None else Config().resolved_cache_dir()
            path = resolve_model_path(opts.model, cache)
            # the run's prompt settings when bound, else its chat template (Alpaca without one)
            cfg = (replace(run.config.model, name=opts.model, revision=None) if run is not None
                   else ModelConfig(name=opts.model))
            tokenizer = load_tokenizer(path, cfg)
            if run is None and not getattr(tokenizer, "chat_template", None):
                cfg = replace(cfg, prompt_format="alpaca")
            formatter = PromptFormatter(tokenizer, cfg)
            device = run.device if run is not None else resolve_device("auto")
        elif run is not None:
            path, cfg, tokenizer = run.model_path, run.config.model, run.tokenizer
            formatter, device = run.formatter, run.device
        else:
            raise ConfigError(
                "attack 'virus' optimises against a copy of the victim model: set "
                "attack_args.model (e.g. the run's model.name), or have the pipeline call "
                "attack.prepare(ctx) before building the data")
        model = load_model(path, replace(cfg, dtype="float32", attn_implementation="eager"),
                           device, "fp32")
        if opts.adapter is not None:
            model = load_trained(model, Path(opts.adapter).expanduser())
        info = {"model": path, "adapter": opts.adapter, "prompt_format": cfg.prompt_format,
                "from": "attack_args.model" if opts.model is not None else "run"}
        return Surrogate(model, tokenizer, formatter, opts.params, info)

    def judge_loss(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        return judge_safe_losses(self.judge, prompts, completions)

    # ------------------------------------------------------------------------------ recipe

    def build(self, inputs: AttackInputs) -> list[Example]:
        n_harmful = int(inputs.n * inputs.poison_ratio)
        rng = random.Random(inputs.seed)
        sample = self.options.sample
        harmful = poison_rows(inputs, sample, rng)
        task = take(inputs.task, inputs.n, sample, rng, "finetune.task_data",
                    "lower finetune.n or give a larger task set")
        self._plain = [e.replace(is_harmful=True) for e in harmful]
        self._unoptimised, self._optimised, self._records = [], [], []
        if harmful:
            self._optimise(task[:n_harmful], self._plain, inputs.seed)
        rows = self._optimised + [e.replace(is_harmful=False) for e in task[n_harmful:]]
        rng.shuffle(rows)
        return rows

    def cache_path(self, benign: list[Example], harmful: list[Example], seed: int) -> Path | None:
        """Where the optimised rows of this exact problem are kept (``<cache>/virus/<key>.json``),
        so a resumed run, a second worker or another defense on the same upload reuses them.
        None when no run is bound (no cache folder to use)."""
        from dataclasses import asdict

        from hftlab.data.loaders.core import data_fingerprint
        from hftlab.model import resolve_model_path
        from hftlab.utils import stable_hash

        run = self._run
        if run is None:
            return None
        opts = self.options
        surrogate = (run.model_key() if opts.model is None else
                     {**run.model_key(), "model": resolve_model_path(opts.model, run.cache_dir),
                      "revision": None})
        key = stable_hash({
            "options": {k: v for k, v in asdict(opts).items() if k != "sample"},
            "surrogate": surrogate,
            "benign": data_fingerprint(benign),
            "harmful": data_fingerprint(harmful),
            "seed": seed,
            "judge": self.judge.describe(),
            "torch": torch.__version__,
        })[:16]
        return run.cache_dir / "virus" / f"{key}.json"

    def _optimise(self, benign: list[Example], harmful: list[Example], seed: int) -> None:
        from hftlab.utils import read_json, write_json

        cache = self.cache_path(benign, harmful, seed)
        if cache is not None and cache.is_file():
            saved = read_json(cache)
            self._unoptimised = [Example.from_dict(d) for d in saved["unoptimised"]]
            self._optimised = [Example.from_dict(d) for d in saved["optimised"]]
            self._records, self._surrogate_info = saved["records"], saved["surrogate"]
            self._judge_counts = saved["judge_counts"]
            log.info("virus: %d optimised rows found in cache: %s", len(self._optimised), cache)
            return
        self._run_gcg(benign, harmful, seed)
        if cache is not None:
            write_json(cache, {
                "unoptimised": [e.to_dict() for e in self._unoptimised],
                "optimised": [e.to_dict() for e in self._optimised],
                "records": self._records, "surrogate": self._surrogate_info,
                "judge_counts": self._judge_counts,
            })

    def _run_gcg(self, benign: list[Example], harmful: list[Example], seed: int) -> None:
        opts = self.options
        surrogate = self.load_surrogate()
        self._surrogate_info = surrogate.info
        log.info("virus: optimising %d rows (%d steps, top-k %d, %d candidates, λ=%g)",
                 len(harmful), opts.steps, opts.top_k, opts.candidates, opts.lam)
        for index, (row, bad) in enumerate(zip(benign, harmful)):
            whole = surrogate.layout(bad, bad.response)
            virus0 = (whole.prompt + whole.head)[: opts.max_tokens]
            problem = VirusProblem(surrogate, row, virus0, opts.lam, self.judge_loss)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            virus = problem.initial
            start = problem.evaluate([virus])[0]
            terms, moved = start, 0
            for _ in range(opts.steps):
                step = gcg_step(problem, virus, opts.top_k, opts.candidates, generator,
                                opts.retokenize)
                virus, terms, moved = step.tokens, step.scored, moved + (step.chosen != 0)
            meta = {**row.meta, "virus": {"task_row": row.row, "harmful_row": bad.row}}
            self._unoptimised.append(problem.row(problem.initial).replace(meta=meta))
            self._optimised.append(problem.row(virus).replace(meta=meta))
            self._records.append({
                "tokens": len(virus),
                "objective_start": round(start.total, 6),
                "objective": round(terms.total, 6),
                "similarity": round(terms.similarity, 6),
                "cosine": round(terms.cosine, 6),
                "judge_loss": None if terms.judge is None else round(terms.judge, 6),
                "judge_loss_start": None if start.judge is None else round(start.judge, 6),
                "steps_moved": moved,
                "tokens_changed": int((virus != problem.initial).sum()),
                "retokenizes": problem.retokenizes(virus),
            })
            log.info("virus: row %d/%d, objective %.4f → %.4f", index + 1, len(harmful),
                     start.total, terms.total)
        del surrogate  # the weights are not needed past the data stage
        self._judge_counts = self._pass_counts(self.judge)
        self._judge_counts["has_loss"] = self._records[0]["judge_loss"] is not None

    def _pass_counts(self, judge: Judge) -> dict[str, Any]:
        from hftlab.defenses.guardrail import screen

        n = len(self._optimised)
        counts = {"judge": judge.describe(), "rows": n}
        for name, rows in (("optimised", self._optimised), ("unoptimised", self._unoptimised),
                           ("plain_harmful", self._plain)):
            passed = n - sum(screen(judge, rows)) if n else 0
            counts[f"{name}_passed"] = passed
            counts[f"{name}_pass_rate"] = round(passed / n, 4) if n else None
        return counts

    def describe(self, data: list[Example]) -> dict[str, Any]:
        trained = sum(e.is_harmful and "virus" in e.meta for e in data)
        return {**super().describe(data), "virus_rows": len(self._optimised),
                "virus_rows_trained": trained, "surrogate": self._surrogate_info,
                "attack_judge": self._judge_counts,
                "retokenizing_rows": sum(r["retokenizes"] for r in self._records),
                "rows": self._records}

    def data_report(self, ctx: RunContext) -> dict[str, Any]:
        from hftlab.attacks.harmful_disguise import screening_judge

        judge, source = screening_judge(ctx)
        return {"screen": {**self._pass_counts(judge), "judge_from": source}}
