"""The training loop against hand computations on the tiny model."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from hftlab.formatting import Tokenized
from hftlab.train import (
    IGNORE_INDEX,
    collate,
    length_grouped_batches,
    lr_lambda,
    supervised_logits,
    supervised_loss,
)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_collate_masks_prompt_and_padding() -> None:
    batch = collate([Tokenized([5, 6, 7, 8], 2), Tokenized([9, 10, 11], 1)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.labels.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 8],
        [IGNORE_INDEX, 10, 11, IGNORE_INDEX],
    ]
    assert batch.n_tokens == 7


def test_loss_on_supervised_positions_equals_full_logits_cross_entropy(tiny_model) -> None:
    batch = collate([Tokenized(list(range(10, 22)), 5), Tokenized(list(range(30, 38)), 3)], 0)
    ours = supervised_loss(tiny_model, batch)
    # Hand computation: every logit, shift by one, mean CE where the label is supervised.
    logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    sel_logits, targets, _ = supervised_logits(tiny_model, batch)
    assert sel_logits.shape[0] == targets.numel() == (12 - 5) + (8 - 3)


def test_length_grouped_batches_cover_every_index_once_with_little_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(203)]
    batches = length_grouped_batches(lengths, 8, random.Random(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    grouped = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    shuffled = list(range(203))
    random.Random(2).shuffle(shuffled)
    plain = sum(
        max(lengths[i] for i in shuffled[s : s + 8]) * len(shuffled[s : s + 8])
        for s in range(0, 203, 8)
    )
    assert grouped < 0.8 * plain
    assert batches == length_grouped_batches(lengths, 8, random.Random(1))  # deterministic


def test_schedules() -> None:
    constant = lr_lambda("constant", warmup=2, total=10)
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = lr_lambda("cosine", warmup=0, total=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-9 and cosine(10) == 0.0
    linear = lr_lambda("linear", warmup=0, total=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
