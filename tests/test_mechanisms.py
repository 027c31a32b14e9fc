from __future__ import annotations

import contextlib

import pytest
import torch

from hftlab.formatting import Tokenized
from hftlab.mechanisms import embedding_drift, hidden_states


def test_drift_is_the_mean_token_distance_per_layer() -> None:
    before = [[torch.zeros(2, 3), torch.zeros(2, 3)], [torch.zeros(1, 3), torch.ones(1, 3)]]
    after = [[torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])],
             [torch.zeros(1, 3), torch.ones(1, 3)]]
    drift = embedding_drift(before, after)
    # layer 1: token distances 5, 0 (example 1) and 0 (example 2) → mean 5/3
    assert drift["per_layer"] == pytest.approx([0.0, 5.0 / 3.0])
    assert drift["mean"] == pytest.approx(5.0 / 6.0)


def test_hidden_states_ignore_padding(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = [Tokenized([5, 6, 7, 8, 9], 5), Tokenized([5, 6], 2)]
    args = (0, 2, torch.device("cpu"), contextlib.nullcontext)
    together = hidden_states(model, items, *args)
    alone = hidden_states(model, items[1:], *args)
    assert [h.shape[0] for h in together[1]] == [2, 2, 2]
    for a, b in zip(together[1], alone[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert embedding_drift(together, together)["mean"] == 0.0
