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


def _dropout_trainer(model_dir, folder, max_steps: int = 5):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from hftlab.config import LoraConfig, TrainConfig
    from hftlab.defenses import DEFENSES
    from hftlab.model import attach_trainable
    from hftlab.train import SFTTrainer

    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, batch_size=3, max_steps=max_steps,
                      lora=LoraConfig(r=4, alpha=8, dropout=0.3))
    model = attach_trainable(AutoModelForCausalLM.from_pretrained(model_dir), cfg)
    return SFTTrainer(model, cfg, Accelerator(cpu=True), 0, "finetune", DEFENSES.get("sft")(),
                      seed=1, checkpoint_dir=folder, checkpoint_every=2)


def _items() -> list[Tokenized]:
    rng = random.Random(0)
    return [Tokenized([rng.randrange(4, 200) for _ in range(rng.randrange(5, 10))], 2)
            for _ in range(7)]


def test_resume_restores_the_random_state_dropout_draws_from(tiny_model_dir, tmp_path) -> None:
    straight = _dropout_trainer(tiny_model_dir, None)
    expected = straight.train(_items())

    def die_at_3(trainer, loss):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _dropout_trainer(tiny_model_dir, tmp_path / "ckpt").train(_items(), on_step=die_at_3)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-000002"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-000002").iterdir()) == [
        "rng-0.json", "rng-0.safetensors", "trainer.json", "trainer.safetensors"]
    resumed = _dropout_trainer(tiny_model_dir, tmp_path / "ckpt")
    got = resumed.train(_items())
    assert resumed.resumed_from == 2 and got.losses == expected.losses
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_checkpoint_of_another_schedule_is_refused(tiny_model_dir, tmp_path) -> None:
    from hftlab.config import ConfigError

    _dropout_trainer(tiny_model_dir, tmp_path / "ckpt", max_steps=3).train(_items())
    with pytest.raises(ConfigError, match=r"trainer\.json.*total_steps 3 \(this run: 5\).*delete"):
        _dropout_trainer(tiny_model_dir, tmp_path / "ckpt").train(_items())


def test_no_checkpoint_folder_without_checkpoint_every(tiny_model_dir, tmp_path) -> None:
    trainer = _dropout_trainer(tiny_model_dir, tmp_path / "ckpt")
    trainer.checkpoint_every = 0
    trainer.train(_items())
    assert not (tmp_path / "ckpt").exists()
