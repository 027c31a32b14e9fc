"""harmful_mix: ``n`` benign task rows with a fraction ``p`` replaced by harmful QA pairs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hftlab.attacks.base import ATTACKS, Attack, AttackInputs
from hftlab.config import ConfigError
from hftlab.data.records import DataError, Example


@ATTACKS.register("harmful_mix")
class HarmfulMix(Attack):
    """The survey's standard attack setting (Vaccine/Lisa/Booster data recipe): the user's data
    holds ``int(n·p)`` harmful QA pairs and ``n − int(n·p)`` benign task rows.

    ``sample: first`` takes the first rows of each source, as the reference code does
    (git-disl/Booster ``train.py``: first ``poison_num`` unsafe BeaverTails pairs, first
    ``normal_num`` task rows); ``sample: random`` draws them with the seed. Either way the rows
    are shuffled with the seed, so the data set is a deterministic function of the seed.
    """

    summary = "n task rows, a fraction p replaced by harmful QA (the survey's standard attack)"
    paper = "Huang et al. 2024 (Vaccine, arXiv 2402.01109) §5; Qi et al. 2023 (arXiv 2310.03693)"
    reference = "git-disl/Vaccine, Lisa, Booster train.py (SupervisedDataset, poison_ratio)"

    @dataclass
    class Options:
        sample: str = "first"  # first | random

        def __post_init__(self) -> None:
            if self.sample not in ("first", "random"):
                raise ConfigError(f"attack_args.sample is {self.sample!r}; use first or random")

    def build(self, inputs: AttackInputs) -> list[Example]:
        n_harmful = int(inputs.n * inputs.poison_ratio)
        n_benign = inputs.n - n_harmful
        if n_harmful > len(inputs.harmful):
            raise DataError(
                f"finetune.n={inputs.n} × poison_ratio={inputs.poison_ratio} needs {n_harmful} "
                f"harmful rows but finetune.harmful_data has {len(inputs.harmful)}: "
                "lower n or poison_ratio, or give a larger harmful set"
            )
        if n_benign > len(inputs.task):
            raise DataError(
                f"finetune.n={inputs.n} needs {n_benign} task rows but finetune.task_data has "
                f"{len(inputs.task)}: lower n or give a larger task set"
            )
        rng = random.Random(inputs.seed)
        if self.options.sample == "random":
            harmful = rng.sample(inputs.harmful, n_harmful)
            benign = rng.sample(inputs.task, n_benign)
        else:
            harmful, benign = inputs.harmful[:n_harmful], inputs.task[:n_benign]
        rows = [e.replace(is_harmful=True) for e in harmful] + benign
        rng.shuffle(rows)
        return rows
