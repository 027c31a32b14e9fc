"""Train / held-out splits for the judges that hftlab trains (the embedding judge and the
guard): whole prompts to one side, and the record of what each side held."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from hftlab.config import ConfigError
from hftlab.data.records import Example, normalize_prompt


def split_by_prompt(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): whole prompts go to one side (BeaverTails repeats prompts with
    different responses), about ``fraction`` of the rows held out, chosen by ``seed``."""
    if fraction <= 0:
        return list(examples), []
    sizes = Counter(normalize_prompt(e.prompt) for e in examples)
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)
    target = round(fraction * len(examples))
    held: set[str] = set()
    count = 0
    for group in groups:
        if count >= target:
            break
        held.add(group)
        count += sizes[group]
    train = [e for e in examples if normalize_prompt(e.prompt) not in held]
    heldout = [e for e in examples if normalize_prompt(e.prompt) in held]
    return train, heldout


def training_split(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """:func:`split_by_prompt` for training a judge: its training side must hold both classes."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the held-out fraction must be in [0, 1), got {fraction}")
    train, heldout = split_by_prompt(examples, fraction, seed)
    labels = [e.is_harmful for e in train]
    if all(labels) or not any(labels):
        raise ConfigError(f"the training rows ({len(train)}) must hold both harmful and harmless "
                          "rows; add a data source of the missing class")
    return train, heldout


def split_record(examples: list[Example], train: list[Example],
                 heldout: list[Example]) -> dict[str, Any]:
    """The rows a judge was trained and checked on, for its description file."""
    return {"rows": {"train": len(train), "train_harmful": sum(e.is_harmful for e in train),
                     "heldout": len(heldout),
                     "heldout_harmful": sum(e.is_harmful for e in heldout)},
            "sources": dict(Counter(e.source for e in examples))}
