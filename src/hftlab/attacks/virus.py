"""virus: harmful rows hidden in benign ones, their tokens optimised so that a guard model
passes the row while its fine-tuning gradient stays that of the harmful data (Huang et al. 2025,
"Virus: Harmful Fine-tuning Attack for LLMs Bypassing Guardrail Moderation", arXiv 2501.17433).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hftlab.attacks.base import ATTACKS, Attack, AttackInputs, check_sample, poison_rows, take
from hftlab.attacks.gcg import gcg_step
from hftlab.attacks.virus_cache import cache_file, search_problem
from hftlab.attacks.virus_guard import TokenGuard, judge_safe_losses
from hftlab.attacks.virus_objective import VirusProblem
from hftlab.attacks.virus_surrogate import Surrogate, aligned_adapter_folder, load_surrogate
from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.judges import JUDGES, Judge
from hftlab.judges.llama_guard import LlamaGuardJudge
from hftlab.options import build
from hftlab.progress import Progress, progress
from hftlab.registry import unknown_name_message

if TYPE_CHECKING:
    from hftlab.config import Config
    from hftlab.context import RunContext

log = logging.getLogger(__name__)

#: Where the matched gradient is taken: ``aligned_lora`` = every weight of the aligned model's
#: LoRA adapter, loaded unmerged (the reference: virus.sh ``--alternating single_lora`` makes
#: train.py load ``--lora_folder`` trainable, and trainer.py matches the gradient of every
#: trainable parameter); ``base_weights`` = the full weights of the modules in ``params`` of the
#: base model (or ``model`` + merged ``adapter``), hftlab's former behaviour.
MATCH_ON = ("aligned_lora", "base_weights")
#: How the guard's loss enters: ``gradient`` = in the GCG proposal gradient (through the virus'
#: one-hot, as trainer.py back-propagates ``loss4``) and in the candidate scores (reference);
#: ``ranking`` = the judge's loss on the decoded text ranks candidates only (the former
#: behaviour, for judges that cannot be differentiated through tokens).
JUDGE_TERMS = ("gradient", "ranking")
#: The reference's guard model (trainer.py: ``LlamaGuardModeration.from_pretrained(...)``).
REFERENCE_GUARD = "meta-llama/Meta-Llama-Guard-2-8B"

#: A CPU-sized run: a few GCG steps over few candidates, on a short virus (the reference's
#: 50 steps × 128 candidates × a whole harmful row take GPU-hours per row on an 8B model).
#: The judge is set by :func:`cpu_preset`.
CPU_PRESET: dict[str, Any] = {"steps": 4, "top_k": 16, "candidates": 8, "max_tokens": 96}


def cpu_preset(judge_path: str | None = None) -> dict[str, Any]:
    """``attack_args`` of the CPU preset: :data:`CPU_PRESET` screened by the embedding judge of
    ``judge_path`` (a folder of ``hftlab judge train``) when given, else by the keyword judge,
    which has no loss (its λ term is then 0). Neither can be differentiated through tokens, so
    the judge's loss only ranks candidates (``judge_term: ranking``)."""
    judge: dict[str, Any] = ({"judge": "embedding", "judge_args": {"path": judge_path}}
                             if judge_path else {"judge": "keyword", "judge_args": {}})
    return {**CPU_PRESET, **judge, "judge_term": "ranking"}


@ATTACKS.register("virus")
class Virus(Attack):
    """Virus (Huang et al. 2025, arXiv 2501.17433), following git-disl/Virus (commit fa297d0)
    ``trainer.py`` (``VirusAttackTrainer`` builds the virus, ``VirusAttackFinetuneTrainer`` the
    fine-tuning data), ``train.py`` (the model the gradient is taken on),
    ``poison/evaluation/moderation.py`` (``LlamaGuardModeration``) and
    ``script/attack/virus.sh``.

    ``int(n·p)`` benign task rows each get a harmful row appended to their answer (the benign
    answer closed by its end-of-turn marker, then the harmful row's whole rendered conversation,
    as the reference concatenates two tokenised rows) and are flagged ``is_harmful``; the other
    rows are plain task rows; all are shuffled with the seed. The appended tokens (the "virus",
    at first the harmful row's tokens, cut to ``max_tokens``) are optimised per row by GCG
    (``steps`` steps) on a surrogate of the victim to minimise the reference's objective
    (trainer.py ``loss_calculate``: ``(1-lamb)*loss3 + lamb*loss4``)

        (1−λ)·(−⟨g(x), g*⟩ / ‖g(x)‖) + λ·L_guard("safe" | x)

    where g(x) is the fine-tuning gradient (mean answer cross-entropy) of the row with the
    virus x over the aligned model's LoRA weights, g* that of the row with the unoptimised
    virus (fixed at the start), ‖g(x)‖ held constant in the gradient (so the term is
    −‖g*‖·cos(g, g*)), and L_guard the guard model's cross-entropy of the token "safe" as its
    first answer token on the Llama Guard prompt of (prompt, answer with virus)
    (:class:`TokenGuard`). Each step: the one-hot gradient of the whole objective gives the
    ``top_k`` best substitutions per position, ``candidates`` random single swaps among them
    are scored by the whole objective, and the best of them and of the current virus is kept.
    The virus starts at the similarity optimum (cos = 1), so the guard term is what moves it.

    Defaults are the reference's (``script/attack/virus.sh``: ``--lamb 0.1 --virus_topk 64
    --virus_bs 128``, 50 epochs over one benign row = 50 steps, ``--alternating single_lora``
    with ``--lora_folder`` the aligned LoRA: train.py loads that adapter unmerged and
    trainable, and trainer.py matches the gradient of every trainable weight, i.e. of the
    aligned LoRA's A and B matrices; Llama Guard 2 8B as the guard). :data:`CPU_PRESET` /
    :func:`cpu_preset` is a CPU-sized setting (fewer steps and candidates, a capped virus, a
    text judge whose loss only ranks candidates); ``configs/sweeps/cpu_attacks.yaml`` sets its
    own (4 steps, top-k 16, 8 candidates).

    Options beyond the reference's numbers:

    - ``match_on``: ``aligned_lora`` (reference) takes g over the aligned adapter, loaded
      unmerged on the surrogate: ``adapter`` when given, else the run's alignment checkpoint
      (``<cache>/aligned/<alignment key>/model``, the one the run's fine-tuning starts from);
      ``base_weights`` (hftlab's former behaviour) over the full weights of the modules in
      ``params`` (default q/k/v) of the base model, or of ``model`` + ``adapter`` merged;
      ``params`` with ``aligned_lora`` keeps the adapter's weights on those modules only;
    - ``judge_term``: ``gradient`` (reference) back-propagates the guard's loss into the
      one-hot (both terms in the proposal gradient and in the scores); it needs the
      ``llama_guard`` judge with a causal-LM guard sharing the surrogate's vocabulary (any model
      folder in ``judge_args.model``; the reference's guard and victim share Llama-3's), and
      fails with a ConfigError for any other judge or vocabulary. ``ranking`` (the former
      behaviour) uses the similarity term alone for the proposal gradient and lets the judge's
      loss on the decoded text (:func:`judge_safe_losses`: llama_guard, embedding, beaverdam;
      none for keyword, whose λ term is 0) rank the candidates.

    The surrogate: :meth:`prepare` binds the run (its model folder, model settings, prompt
    format, device, alignment checkpoint); the option ``model`` names another (a folder, hub
    id or ``embedded``; formatted as the run says when bound, else in its chat template, or
    Alpaca without one). The data stage records the options, the surrogate (and the adapter
    the gradient is matched on), each optimised row's objective (start and end), similarity,
    cosine, judge loss and changed tokens, how many rows the attack's judge passes optimised
    vs. unoptimised vs. as plain harmful rows, and (:meth:`data_report`) the same counts for
    the run's screening judge (the guardrail's, else the keyword judge). Counts only, never
    text.

    Departures from the reference, and why:

    - the aligned adapter must exist when the data is built: the pipeline builds the upload
      (data stage) before it aligns, so ``aligned_lora`` reads the run's alignment from the
      alignment cache (filled by an earlier run with the same alignment, e.g. a sweep's group
      leader) and fails with a ConfigError saying so when it is not there yet;
    - the guard reads the row as it is uploaded and screened: (prompt, benign answer with its
      end-of-turn marker ⊕ virus), in the prompt the ``llama_guard`` judge renders (the
      reference regex-parses its Alpaca row into instruction and response and inserts the
      virus before "<END CONVERSATION>" of Llama Guard 2's own template);
    - the provider trains on text: the virus is decoded and re-tokenised by the provider.
      ``retokenize`` keeps only candidates that survive that round trip (the reference's
      ``recoverable_x`` check is commented out: default off); the record counts final rows that
      do;
    - the reference's fine-tuning row is [benign, virus, benign] (``VirusAttackFinetuneTrainer``)
      although it optimised [benign, virus]; here the trained row is the optimised and screened
      one, benign ⊕ virus;
    - substitutions also exclude every special/added token and embedding rows past the
      tokenizer (the reference excludes non-printable/non-ASCII tokens and bos/eos/pad/unk);
    - rows: the reference pairs benign row i with BeaverTails row 5000+i; here the i-th sampled
      harmful row with the i-th sampled task row (``sample``: first or seeded random);
    - the surrogate in fp32 with eager attention, the guard in its judge's dtype (the
      reference: both bf16, math SDPA kernel); the reference's monitoring optimizer step (undone
      after each step) is left out; ``max_tokens`` (default None = whole row) caps the virus
      for CPU runs.
    """

    summary = ("harmful rows appended to benign ones, GCG-optimised to pass a guard model "
               "while keeping the harmful gradient on the aligned LoRA (Virus)")
    paper = "Huang et al. 2025, Virus, arXiv 2501.17433"
    reference = ("git-disl/Virus trainer.py (VirusAttackTrainer, VirusAttackFinetuneTrainer), "
                 "train.py, poison/evaluation/moderation.py, script/attack/virus.sh")

    @dataclass
    class Options:
        steps: int = 50  # virus.sh: --num_train_epochs 50 over --sample_num 1 row
        top_k: int = 64  # virus.sh: --virus_topk 64
        candidates: int = 128  # virus.sh: --virus_bs 128
        lam: float = 0.1  # virus.sh: lamb=${2:-0.1}
        judge: str = "llama_guard"  # the guard model whose "safe" loss is minimised
        # None: Llama Guard 2 8B for the llama_guard judge (reference), no options otherwise
        judge_args: dict[str, Any] | None = None
        judge_term: str = "gradient"  # gradient (reference) | ranking (former)
        match_on: str = "aligned_lora"  # aligned_lora (reference) | base_weights (former)
        params: list[str] | None = None  # None: the whole adapter / q,k,v (base_weights)
        max_tokens: int | None = None  # None: the whole harmful row, as the reference
        retokenize: bool = False  # reference: the recoverable_x filter is commented out
        model: str | None = None  # surrogate; None = the run's (via prepare)
        adapter: str | None = None  # aligned LoRA folder; None = the run's alignment
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
            if self.params is not None and not self.params:
                raise ConfigError(f"{where}: params must name at least one module (or be null)")
            for name, value, allowed in (("judge_term", self.judge_term, JUDGE_TERMS),
                                         ("match_on", self.match_on, MATCH_ON)):
                if value not in allowed:
                    raise ConfigError(f"{where}: {name} is {value!r}; use {' or '.join(allowed)}")
            if self.judge not in JUDGES:
                raise ConfigError(f"{where}: " + unknown_name_message("judge", self.judge,
                                                                      JUDGES.names()))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = self.options
        judge_args = opts.judge_args
        if judge_args is None:
            judge_args = {"model": REFERENCE_GUARD} if opts.judge == "llama_guard" else {}
        self.judge: Judge = JUDGES.get(opts.judge)(**judge_args)
        if opts.judge_term == "gradient" and opts.lam > 0 and not isinstance(self.judge,
                                                                           LlamaGuardJudge):
            raise ConfigError(
                f"attack 'virus' (judge_term: gradient) back-propagates the guard's \"safe\" loss "
                f"into the virus tokens, which needs a causal-LM guard (judge: llama_guard, "
                f"judge_args.model: a guard folder sharing the victim's tokenizer); judge "
                f"'{opts.judge}' cannot be differentiated through tokens: use judge_term: "
                f"ranking to let its loss rank the candidates only")
        self._run: RunContext | None = None
        self._plain: list[Example] = []  # the harmful rows as they came
        self._unoptimised: list[Example] = []  # benign ⊕ harmful row, before GCG
        self._optimised: list[Example] = []
        self._records: list[dict[str, Any]] = []
        self._surrogate_info: dict[str, Any] = {}
        self._judge_counts: dict[str, Any] = {}
        # the GCG search's seconds when it ran (kept in the cache) and whether this run reused it
        self._search: dict[str, Any] | None = None

    def prepare(self, ctx: RunContext) -> None:
        """Bind the run whose data this attack builds: the surrogate becomes the run's model
        unless the option ``model`` names another, and ``aligned_lora`` reads the run's
        alignment checkpoint unless ``adapter`` names one. To be called before :meth:`build`."""
        self._run = ctx

    # -------------------------------------------------------------------------- surrogate

    def aligned_adapter(self) -> tuple[Path, str]:
        """(folder, where it comes from) of the aligned LoRA the gradient is matched on: the
        option ``adapter``, else the bound run's alignment checkpoint; not checked for existence
        (see :meth:`load_surrogate`)."""
        return aligned_adapter_folder(self._run, self.options.adapter)

    def load_surrogate(self) -> Surrogate:
        opts = self.options
        return load_surrogate(self._run, opts.model, opts.adapter, opts.match_on, opts.params)

    def judge_loss(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        return judge_safe_losses(self.judge, prompts, completions)

    def token_guard(self, surrogate: Surrogate) -> TokenGuard | None:
        """The differentiable guard term (``judge_term: gradient``), or None (``ranking``)."""
        if self.options.judge_term != "gradient" or not isinstance(self.judge, LlamaGuardJudge):
            return None
        return TokenGuard(self.judge, surrogate.tokenizer)

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
        self._search = None
        if harmful:
            self._optimise(task[:n_harmful], self._plain, inputs.seed)
        rows = self._optimised + [e.replace(is_harmful=False) for e in task[n_harmful:]]
        rng.shuffle(rows)
        return rows

    @classmethod
    def search_problem(cls, config: Config, alignment: str) -> dict[str, Any]:
        options = build(cls.Options, config.attack_args, where="attack_args of 'virus'", prefix="")
        return search_problem(config, options, alignment)

    def _optimise(self, benign: list[Example], harmful: list[Example], seed: int) -> None:
        from hftlab.utils import read_json, write_json

        run = self._run
        cache = None if run is None else cache_file(run, self.options, self.judge, benign,
                                                    harmful, seed)
        if cache is not None and cache.is_file():
            saved = read_json(cache)
            self._unoptimised = [Example.from_dict(d) for d in saved["unoptimised"]]
            self._optimised = [Example.from_dict(d) for d in saved["optimised"]]
            self._records, self._surrogate_info = saved["records"], saved["surrogate"]
            self._judge_counts = saved["judge_counts"]
            self._search = {"cached": True, "seconds": saved.get("search_seconds")}
            log.info("virus: %d optimised rows found in cache: %s", len(self._optimised), cache)
            return
        start = time.perf_counter()
        self._run_gcg(benign, harmful, seed)
        self._search = {"cached": False, "seconds": round(time.perf_counter() - start, 3)}
        if cache is not None:
            write_json(cache, {"search_seconds": self._search["seconds"],
                "unoptimised": [e.to_dict() for e in self._unoptimised],
                "optimised": [e.to_dict() for e in self._optimised],
                "records": self._records, "surrogate": self._surrogate_info,
                "judge_counts": self._judge_counts,
            })

    def _run_gcg(self, benign: list[Example], harmful: list[Example], seed: int) -> None:
        opts = self.options
        surrogate = self.load_surrogate()
        guard = self.token_guard(surrogate)
        self._surrogate_info = {**surrogate.info, "judge_term": opts.judge_term,
                                "guard_gradient": guard is not None}
        log.info("virus: optimising %d rows (%d steps, top-k %d, %d candidates, λ=%g, judge "
                 "term: %s, gradient on: %s)", len(harmful), opts.steps, opts.top_k,
                 opts.candidates, opts.lam, opts.judge_term, opts.match_on)
        with progress(len(harmful) * opts.steps, "virus gcg") as bar:
            self._optimise_rows(benign, harmful, seed, surrogate, guard, bar)
        del surrogate, guard  # the weights are not needed past the data stage
        self._judge_counts = self._pass_counts(self.judge)
        self._judge_counts["has_loss"] = self._records[0]["judge_loss"] is not None

    def _optimise_rows(self, benign: list[Example], harmful: list[Example], seed: int,
                       surrogate: Surrogate, guard: TokenGuard | None, bar: Progress) -> None:
        opts = self.options
        for index, (row, bad) in enumerate(zip(benign, harmful)):
            whole = surrogate.layout(bad, bad.response)
            virus0 = (whole.prompt + whole.head)[: opts.max_tokens]
            problem = VirusProblem(surrogate, row, virus0, opts.lam, self.judge_loss, guard)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            virus = problem.initial
            start = problem.evaluate([virus])[0]
            terms, moved = start, 0
            for _ in range(opts.steps):
                step = gcg_step(problem, virus, opts.top_k, opts.candidates, generator,
                                opts.retokenize)
                virus, terms, moved = step.tokens, step.scored, moved + (step.chosen != 0)
                bar.update(1, objective=terms.total)
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
                "attack_judge": self._judge_counts, "search": self._search,
                "retokenizing_rows": sum(r["retokenizes"] for r in self._records),
                "rows": self._records}

    def data_report(self, ctx: RunContext) -> dict[str, Any]:
        from hftlab.attacks.harmful_disguise import screening_judge

        judge, source = screening_judge(ctx)
        return {"screen": {**self._pass_counts(judge), "judge_from": source}}
