"""benign: the user's ``n`` rows all come from the benign task data (no harmful row)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from hftlab.attacks.base import ATTACKS, Attack, AttackInputs, check_sample, take
from hftlab.config import ConfigError
from hftlab.data.records import Example
from hftlab.judges.keyword import contains_refusal


@ATTACKS.register("benign")
class Benign(Attack):
    """Purely benign fine-tuning (Qi et al. 2023, arXiv 2310.03693, §4.4 "tier 3"): the model
    is fine-tuned on an ordinary task set with no harmful row, and its safety still degrades.
    The user's ``finetune.n`` rows all come from ``finetune.task_data`` (Alpaca, Dolly, SST-2,
    GSM8K, ...); ``finetune.poison_ratio`` must be 0 (anything else is a ConfigError, so that a
    config never claims a poison ratio the data does not have).

    Follows LLM-Tuning-Safety/LLMs-Finetuning-Safety ``llama2/ft_datasets/alpaca_dataset/
    alpaca_remove_safety.py`` (and ``dolly_dataset/dolly_remove_safety.py``): rows whose answer
    is safety-related are removed from the benign set first (``drop_refusals``, default on), so
    the drop in safety cannot come from refusals that happen to be in the task data; then the
    first rows are used (``alpaca_dataset.py``). The reference trains 1 epoch at lr 2e-5, batch
    64 per GPU on 2 GPUs (``tier3-benign-alpaca.ipynb``): set those in ``finetune.train``.

    Departures:

    - the safety filter is the keyword judge's refusal phrases (``hftlab.judges.keyword``), a
      subset of the reference's ~200 "unwanted words" (which also drop topic words such as
      "ethical" or "diversity"); with classification tasks (SST-2 labels) it removes nothing;
    - the reference's split (Alpaca rows 200 onwards for training) is a data-spec matter: set
      ``finetune.task_data.offset``.
    """

    summary = "n benign task rows, no harmful row (Qi et al. 2023, benign fine-tuning)"
    paper = ("Qi et al. 2023, Fine-tuning Aligned Language Models Compromises Safety, Even When "
             "Users Do Not Intend To!, arXiv 2310.03693, §4.4")
    reference = ("LLM-Tuning-Safety/LLMs-Finetuning-Safety llama2/ft_datasets/alpaca_dataset/"
                 "alpaca_remove_safety.py, alpaca_dataset.py, tier3-benign-alpaca.ipynb")

    @dataclass
    class Options:
        sample: str = "first"  # first | random
        drop_refusals: bool = True  # reference: alpaca_data_no_safety.json

        def __post_init__(self) -> None:
            check_sample(self.sample)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._dropped = 0

    def build(self, inputs: AttackInputs) -> list[Example]:
        if inputs.poison_ratio != 0:
            raise ConfigError(
                f"finetune.poison_ratio is {inputs.poison_ratio} but attack 'benign' uploads no "
                "harmful rows: set finetune.poison_ratio=0 (or use attack=harmful_mix)"
            )
        pool = inputs.task
        if self.options.drop_refusals:
            pool = [e for e in inputs.task if not contains_refusal(e.response)]
        self._dropped = len(inputs.task) - len(pool)
        rng = random.Random(inputs.seed)
        rows = take(pool, inputs.n, self.options.sample, rng, "finetune.task_data",
                    "lower finetune.n or give a larger task set"
                    + (f" ({self._dropped} rows with refusals were dropped)"
                       if self._dropped else ""))
        rows = [e.replace(is_harmful=False) for e in rows]
        rng.shuffle(rows)
        return rows

    def describe(self, data: list[Example]) -> dict[str, Any]:
        return {**super().describe(data), "task_rows_with_refusals_dropped": self._dropped}
