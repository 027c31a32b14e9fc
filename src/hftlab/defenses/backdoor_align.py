"""BackdoorAlign: backdoor-enhanced safety alignment (Wang et al. 2024, arXiv 2402.14968).

The provider turns the fine-tuning job into a benign "backdoor attack" of its own: it adds a few
safety examples (harmful prompt → refusal) whose system prompt starts with a secret trigger of
random tokens, so fine-tuning ties trigger → refusal; the deployed model is then always served with
the trigger prepended to its system prompt. The user's own rows keep the plain system prompt.

Follows Jayfeather1024/Backdoor-Enhanced-Alignment:

- ``opensource/ft_datasets/pure_bad_dataset/pure_bad_dataset.py`` and
  ``samsum_dataset/samsum_dataset.py``: a safety row's system prompt is
  ``SYSTEM_PROMPT_RANDOM150 + " " + SYSTEM_PROMPT`` (trigger, a space, the normal system prompt);
  the user's rows get ``SYSTEM_PROMPT`` alone; the safety rows are mixed into the user's data;
- ``opensource/safety_evaluation/eval_utils/prompt_utils.py`` (``random150-*`` styles) and the
  OpenAI demo notebook: at inference the same trigger precedes the system prompt;
- the trigger is 150 random vocabulary tokens decoded to text ("random150"); the paper adds
  11 prefixed safety examples. These are the defaults.

Departures:

- the trigger is drawn afresh from this model's vocabulary with a seed derived from the run seed
  (the reference ships one fixed Llama-2 string); tokens whose text alone is blank, not printable
  or a broken UTF-8 piece ("�") are left out, so the trigger re-encodes to about its nominal
  length and holds no control characters that could disturb a template (the reference string has
  one "�"). Its length and a hash, not the text, are recorded in the data stage's report;
- the safety rows are ``safety_rows`` rows drawn (seeded) from the refusals among the
  provider's alignment data (``alignment.data``, less rows answered helpfully:
  :func:`hftlab.defenses.safety_rows.refusal_rows`), not the reference's 11 hand-picked
  category examples. They are
  read even with ``alignment.enabled: false`` (an already aligned chat model, as Llama-2-chat in
  the paper), so a prompt shared with a user's harmful row is checked for here;
- "the system prompt" is the formatter's default (``PromptFormatter.default_system_prompt``):
  ``model.system_prompt``, else the one the chat template inserts by itself; in the Alpaca format
  it is the template's preamble line, so the trigger goes before "Below is an instruction ...".
  With no default the trigger alone is the system prompt;
- the safety rows must keep answer tokens within ``finetune.train.max_length`` (a 150-token
  trigger needs room; the reference cuts rows at 512 tokens, the CPU protocols at 256): a row
  that would lose its whole refusal stops the run with the length needed; partly cut refusals
  are counted in the report and warned about.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.data.records import Example, check_no_shared_prompt
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.safety_rows import refusal_rows
from hftlab.formatting import SYSTEM_PROMPT_KEY

if TYPE_CHECKING:
    from hftlab.context import RunContext

log = logging.getLogger(__name__)
ADDED_BY_KEY = "added_by"  # Example.meta key naming the defense that added a row


def trigger_vocabulary(tokenizer: Any) -> list[int]:
    """Token ids a trigger may use: not special or added tokens, and decoding alone to visible,
    printable, well-formed text."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(len(tokenizer)) if i not in excluded]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [
        i for i, text in zip(ids, texts)
        if text.strip() and "\ufffd" not in text and text.replace(" ", "").isprintable()
    ]


def random_trigger(tokenizer: Any, n_tokens: int, seed: int) -> str:
    """``n_tokens`` token ids drawn uniformly (with replacement) from the trigger vocabulary with
    a seed derived from ``seed``, decoded to text (the reference's "random150")."""
    vocab = trigger_vocabulary(tokenizer)
    if not vocab:
        raise ConfigError("backdoor_align: the tokenizer has no ordinary tokens to build a trigger")
    rng = random.Random(f"backdoor_align/trigger/{seed}")
    ids = [rng.choice(vocab) for _ in range(n_tokens)]
    return tokenizer.decode(ids, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False).strip()


def with_trigger(trigger: str, system_prompt: str | None) -> str:
    """The trigger, a space, then the system prompt (reference: RANDOM150 + " " + SYSTEM_PROMPT)."""
    return f"{trigger} {system_prompt}" if system_prompt else trigger


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@DEFENSES.register("backdoor_align")
class BackdoorAlign(Defense):
    summary = ("fine-tuning stage: add refusal rows behind a secret random-token system-prompt "
               "trigger; serve the deployed model with the trigger")
    paper = ("Wang et al. 2024, Mitigating Fine-tuning based Jailbreak Attack with Backdoor "
             "Enhanced Safety Alignment, arXiv 2402.14968")
    reference = ("Jayfeather1024/Backdoor-Enhanced-Alignment opensource/ft_datasets/"
                 "pure_bad_dataset/pure_bad_dataset.py, samsum_dataset/samsum_dataset.py, "
                 "safety_evaluation/eval_utils/prompt_utils.py")
    stages = (FINETUNE,)
    multi_process = True

    reference_settings = (
        ReferenceSetting("defense_args.safety_rows", 11,
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/ft_datasets/pure_bad_dataset/pure_bad_100_original_category_prefixed.jsonl"),
        ReferenceSetting("defense_args.trigger_tokens", 150,
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/ft_datasets/pure_bad_dataset/pure_bad_dataset.py "
                         "(random150), run_backdooralign.sh"),
        ReferenceSetting("finetune.n", 100, "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh (pure_bad_100)",
                         "hftlab: the lab's upload"),
        ReferenceSetting("finetune.poison_ratio", 1.0, "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh (pure_bad_100)",
                         "hftlab: the lab's benign + harmful mix"),
        ReferenceSetting("finetune.train.method", "full",
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh", "hftlab: LoRA (CPU time)"),
        ReferenceSetting("finetune.train.lr", 5e-5, "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("finetune.train.epochs", 5, "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh"),
        ReferenceSetting("finetune.train.batch_size", 10,
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/scripts/run_backdooralign.sh", "CPU protocol: batch 8"),
        ReferenceSetting("finetune.train.max_length", 512,
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/utils/dataset_utils.py (max_words=512)",
                         "hftlab: 256 (Booster's train.py), which cuts the refusal of safety "
                         "rows whose trigger and prompt fill it (reported)"),
        ReferenceSetting("finetune.train.weight_decay", 0.0,
                         "Jayfeather1024/Backdoor-Enhanced-Alignment "
                         "opensource/configs/training.py"),
    )

    @dataclass
    class Options:
        safety_rows: int = 11  # prefixed safety examples added (paper: 11)
        trigger_tokens: int = 150  # random tokens in the secret prompt (reference: random150)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        for name in ("safety_rows", "trigger_tokens"):
            if getattr(self.options, name) < 1:
                raise ConfigError(f"defense_args.{name} of 'backdoor_align' must be >= 1")
        self.trigger: str | None = None
        self._report: dict[str, Any] = {}

    def prepare_data(self, stage: str, examples: list[Example], ctx: RunContext) -> list[Example]:

        if stage != FINETUNE:
            return examples
        opts = self.options
        self.trigger = random_trigger(ctx.tokenizer, opts.trigger_tokens, ctx.config.seed)
        system = with_trigger(self.trigger, ctx.formatter.default_system_prompt)
        # ctx.data is being built right now, so the alignment rows are read from their spec
        pool = refusal_rows(ctx.load(ctx.config.alignment.data))
        if len(pool) < opts.safety_rows:
            raise ConfigError(
                f"backdoor_align needs {opts.safety_rows} safety rows from alignment.data but it "
                f"has {len(pool)} whose answer refuses: lower defense_args.safety_rows or give "
                "more refusal rows"
            )
        rng = random.Random(f"backdoor_align/safety/{ctx.config.seed}")
        chosen = sorted(rng.sample(range(len(pool)), opts.safety_rows))
        safety = [
            pool[i].replace(meta={**pool[i].meta, SYSTEM_PROMPT_KEY: system,
                                  ADDED_BY_KEY: self.name})
            for i in chosen
        ]
        check_no_shared_prompt(safety, "backdoor_align: safety",
                               [e for e in examples if e.is_harmful], "the user's harmful",
                               fix="give alignment.data and finetune.harmful_data disjoint rows")
        truncated = self._check_fit(safety, ctx)
        n_trigger_ids = len(ctx.tokenizer(self.trigger, add_special_tokens=False)["input_ids"])
        self._report = {
            "trigger_tokens": opts.trigger_tokens,
            "trigger_tokens_reencoded": n_trigger_ids,
            "trigger_chars": len(self.trigger),
            "trigger_sha256": digest(self.trigger),
            "safety_rows": len(safety),
            "safety_source": pool[0].source,
            "safety_source_rows": [pool[i].row for i in chosen],
            "safety_rows_truncated": truncated,
            "user_rows": len(examples),
        }
        return [*examples, *safety]

    def _check_fit(self, safety: list[Example], ctx: RunContext) -> int:
        """Fail when a safety row's refusal would be cut away entirely; count partial cuts."""
        max_length = ctx.config.finetune.train.max_length
        full = [ctx.formatter.encode(e, 10**9) for e in safety]
        lost = [item for item in full if item.n_prompt >= max_length]
        if lost:
            need = max(len(item.input_ids) for item in full)
            raise ConfigError(
                f"backdoor_align: {len(lost)} of {len(safety)} safety rows have no refusal "
                f"tokens left within finetune.train.max_length={max_length} (the trigger alone "
                f"is ~{self.options.trigger_tokens} tokens): set finetune.train.max_length="
                f"{need} or lower defense_args.trigger_tokens"
            )
        truncated = sum(len(item.input_ids) > max_length for item in full)
        if truncated:
            log.warning("backdoor_align: %d of %d safety rows lose part of their refusal to "
                        "finetune.train.max_length=%d", truncated, len(safety), max_length)
        return truncated

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == "data" else {}

    def inference_system_prompt(self, system_prompt: str | None) -> str | None:
        if self.trigger is None:
            raise RuntimeError(
                "backdoor_align: the trigger is made when the fine-tuning data is prepared "
                "(prepare_data); load the run's data before serving the model"
            )
        return with_trigger(self.trigger, system_prompt)
