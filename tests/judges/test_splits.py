"""Train / held-out splits of the judges hftlab trains (judges/splits.py)."""

from __future__ import annotations

import pytest

from hftlab.config import ConfigError
from hftlab.data.records import Example, normalize_prompt
from hftlab.judges.splits import split_by_prompt, split_record, training_split


def rows(n_prompts: int = 10, per_prompt: int = 3) -> list[Example]:
    """Each prompt repeated with several responses (as BeaverTails repeats them); the odd
    prompts' rows harmful."""
    return [Example(prompt=f"Prompt number {p}?", response=f"answer {k}", is_harmful=bool(p % 2),
                    source=f"source{p % 3}", row=p * per_prompt + k)
            for p in range(n_prompts) for k in range(per_prompt)]


def test_split_keeps_each_prompt_on_one_side() -> None:
    examples = rows()
    train, held = split_by_prompt(examples, 0.25, seed=1)
    assert len(train) + len(held) == len(examples) and held
    assert not ({normalize_prompt(e.prompt) for e in train}
                & {normalize_prompt(e.prompt) for e in held})
    assert len(held) == 9  # whole prompts of 3 rows until a quarter of the 30 rows is reached
    assert split_by_prompt(examples, 0.25, seed=1) == (train, held)
    assert split_by_prompt(examples, 0.0, seed=1) == (examples, [])


def test_a_training_side_of_one_class_or_a_bad_fraction_is_refused() -> None:
    with pytest.raises(ConfigError, match="both harmful and harmless"):
        training_split([e for e in rows() if e.is_harmful], 0.2, seed=0)
    for fraction in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
            training_split(rows(), fraction, seed=0)


def test_split_record_counts_each_side_and_source() -> None:
    examples = rows()
    train, held = training_split(examples, 0.2, seed=3)
    record = split_record(examples, train, held)
    assert record["rows"] == {
        "train": len(train), "train_harmful": sum(e.is_harmful for e in train),
        "heldout": len(held), "heldout_harmful": sum(e.is_harmful for e in held)}
    assert record["sources"] == {"source0": 12, "source1": 9, "source2": 9}
