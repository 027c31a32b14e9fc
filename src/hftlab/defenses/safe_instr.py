"""SafeInstr: mix refusal examples into the user's fine-tuning data (Bianchi et al. 2024,
"Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that Follow
Instructions", arXiv 2309.07875; the git-disl papers' "SafeInstr" baseline).

The paper shows that adding a few hundred (harmful instruction → refusal) pairs to instruction
tuning ("adding just 3% safety examples") keeps the tuned model safe; the fine-tuning-as-a-service
literature applies it as a provider-side defense: before running the user's job, the provider
adds its own safety rows to the user's data. The reference data (vinid/safety-tuned-llamas
``data/training/README.md``: ``saferpaca_Instructions_X.json`` = 20k Alpaca rows + X safety rows,
X = 100 … 2000) ADDS the safety rows on top of the instruction data, so here

    n_safety = max(1, round(ratio · len(user rows))),   added on top (the user's rows all kept),

with ratio = 0.03 by default (the paper's headline 3%; its sweep spans 0.5%–10%); ``n`` sets the
count directly (the reference's X) instead. The safety rows are a seeded random sample
(``config.seed``) without replacement from the provider's refusal set:

- ``source: alignment`` (default): the refusals among the run's ``alignment.data``
  (:func:`hftlab.defenses.safety_rows.refusal_rows`: in configs/cpu_sst2.yaml every row, the
  Safety-Tuned LLaMAs refusal pairs themselves; in configs/cpu_sst2_ref.yaml its 191 refusals,
  not its 400 benign Alpaca answers), loaded from its spec even when the alignment stage is
  disabled;
- ``source: data``: a separate refusal set given as a data spec in ``data``.

Either way the rows must not share a prompt with the user's harmful rows or the mechanisms'
held-out sets (DataError, as for the alignment data); harmful eval prompts among them are counted
in the report (the run's overlap policy). The user's rows come first, unchanged and in their
order; the safety rows follow in the sampled order (the trainer shuffles batches anyway; keeping
the user's rows first means per-row tools such as the task-loss curve's first benign rows still
see the user's data). Safety rows carry ``meta["added_by"] = "safe_instr"``.

Departures: the reference trains with Alpaca-LoRA on the mixed set from a base model; here the
mixing is the only change to the lab's fine-tuning stage (the trainer and its settings are the
run's). Cost: n_safety more rows per epoch, nothing else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.data.records import Example, check_no_shared_prompt, normalize_prompt
from hftlab.data.spec import DataSpec
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.safety_rows import refusal_rows

if TYPE_CHECKING:
    from hftlab.context import RunContext

SOURCES = ("alignment", "data")


def safety_count(n_user: int, ratio: float, n: int | None) -> int:
    """How many safety rows to add: ``n`` when given, else round(ratio · n_user) (halves up), at
    least one for non-empty user data (a defense that rounds to nothing would silently be SFT)."""
    if n is not None:
        return n
    return max(1, int(ratio * n_user + 0.5)) if n_user else 0


def sample_rows(rows: list[Example], k: int, seed: int) -> list[Example]:
    """``k`` rows drawn without replacement, in an order fixed by ``seed``."""
    rng = random.Random(f"safe_instr:{seed}")
    return [rows[i] for i in rng.sample(range(len(rows)), k)]


@DEFENSES.register("safe_instr")
class SafeInstr(Defense):
    summary = "fine-tuning stage: add the provider's refusal examples to the user's data (3%)"
    paper = (
        "Bianchi et al. 2024, Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large "
        "Language Models that Follow Instructions, arXiv 2309.07875"
    )
    reference = (
        "vinid/safety-tuned-llamas data/training/README.md (saferpaca = 20k Alpaca + X safety "
        "rows), training/finetuning.py"
    )
    stages = (FINETUNE,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.ratio", 0.03,
                         "Bianchi et al. 2024, arXiv 2309.07875, abstract ('just 3%')"),
        ReferenceSetting("defense_args.n", [100, 300, 500, 1000, 1500, 2000],
                         "vinid/safety-tuned-llamas data/training/README.md",
                         "hftlab: ratio of the user's rows"),
        ReferenceSetting("defense_args.source", "data",
                         "vinid/safety-tuned-llamas data/training/README.md (a separate safety "
                         "set)", "hftlab: alignment.data (cpu_sst2.yaml: the same file)"),
        ReferenceSetting("defense_args.data", "safety_only_data_Instructions.json",
                         "vinid/safety-tuned-llamas data/training/README.md",
                         "hftlab: alignment.data (cpu_sst2.yaml: the same file)"),
        ReferenceSetting("finetune.n", 20000,
                         "vinid/safety-tuned-llamas data/training/README.md (20k Alpaca rows)",
                         "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.0,
                         "vinid/safety-tuned-llamas data/training/README.md",
                         "hftlab: the lab's harmful upload"),
        ReferenceSetting("finetune.train.lr", 0.0003,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("finetune.train.epochs", 3,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "hftlab's fine-tuning recipe: 5 epochs"),
        ReferenceSetting("finetune.train.batch_size", 4,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults): "
                         "micro batch", "hftlab: batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.grad_accum", 32,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults): 128 "
                         "/ 4", "hftlab: no accumulation"),
        ReferenceSetting("finetune.train.max_length", 256,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults): "
                         "cutoff_len"),
        ReferenceSetting("finetune.train.lora.r", 8,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "hftlab: the run's fine-tuning adapter"),
        ReferenceSetting("finetune.train.lora.alpha", 16,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "hftlab: the run's fine-tuning adapter"),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "v_proj"],
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "hftlab: the run's fine-tuning adapter"),
        ReferenceSetting("finetune.train.lora.dropout", 0.05,
                         "vinid/safety-tuned-llamas training/finetuninig.py (train defaults)",
                         "hftlab: the run's fine-tuning adapter"),
    )

    @dataclass
    class Options:
        ratio: float = 0.03  # safety rows per user row, added on top (paper: "3%")
        n: int | None = None  # exact number of safety rows (reference's X); overrides ratio
        source: str = "alignment"  # alignment (the run's alignment.data) | data
        data: DataSpec | None = None  # the refusal set when source: data

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if not 0.0 < o.ratio <= 1.0:
            raise ConfigError(
                f"defense_args.ratio of 'safe_instr' must be in (0, 1] (safety rows per user "
                f"row; the paper uses 0.03), got {o.ratio}"
            )
        if o.n is not None and o.n < 1:
            raise ConfigError("defense_args.n of 'safe_instr' must be >= 1 (or null: use ratio)")
        if o.source not in SOURCES:
            raise ConfigError(
                f"defense_args.source '{o.source}' of 'safe_instr' must be one of "
                f"{', '.join(SOURCES)}"
            )
        if (o.source == "data") != (o.data is not None):
            raise ConfigError(
                "defense_args.data of 'safe_instr' is the refusal set of source: data; give it "
                "with source: data and only then (e.g. data: {kind: refusal, path: ..., n: 200})"
            )
        self._report: dict[str, Any] = {}

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:
        if stage != FINETUNE:
            return examples
        cfg = ctx.config
        spec = cfg.alignment.data if self.options.source == "alignment" else self.options.data
        assert spec is not None
        where = "alignment.data" if self.options.source == "alignment" else "defense_args.data"
        loaded = ctx.load(spec)
        pool = refusal_rows(loaded) if self.options.source == "alignment" else loaded
        check_disjoint_from_held_out(pool, where, examples, ctx)
        k = safety_count(len(examples), self.options.ratio, self.options.n)
        if k > len(pool):
            refusing = " whose answer refuses" if self.options.source == "alignment" else ""
            raise ConfigError(
                f"safe_instr needs {k} safety rows but {where} has {len(pool)}{refusing}: lower "
                "defense_args.ratio / n or give more refusal rows"
            )
        added = [row.replace(meta={**row.meta, "added_by": self.name})
                 for row in sample_rows(pool, k, cfg.seed)]
        eval_prompts = {normalize_prompt(e.prompt) for e in ctx.load(cfg.eval.harmful)}
        self._report = {
            "safety_rows_added": k,
            "source": where,
            "source_rows": len(loaded),
            "refusal_rows": len(pool),
            "user_rows": len(examples),
            "ratio": round(k / len(examples), 4) if examples else None,
            "rows": sorted(e.row for e in added),
            "eval_harmful_prompts_among_added": sum(
                normalize_prompt(e.prompt) in eval_prompts for e in added
            ),
        }
        return [*examples, *added]

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == "data" else {}


def check_disjoint_from_held_out(
    pool: list[Example], where: str, user: list[Example], ctx: RunContext
) -> None:
    """Refusal rows must not share a prompt with the user's harmful rows or the mechanisms'
    held-out sets (loaded as the run loads them)."""

    cfg = ctx.config
    mech = cfg.mechanisms
    others = [("finetune.harmful_data (user)", [e for e in user if e.is_harmful])]
    if mech.every or mech.drift:
        others.append(("mechanisms.alignment_data", ctx.load(mech.alignment_data)))
    if mech.every:
        others.append(("mechanisms.harmful_data", ctx.load(mech.harmful_data)))
    for name, rows in others:
        check_no_shared_prompt(pool, f"safe_instr's safety rows ({where})", rows, name,
                               fix="give disjoint offset/n slices")
