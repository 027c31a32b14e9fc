"""Every registered defense goes through every stage on the tiny model: finite losses,
trainable parameters change, shapes are kept, and the saved stage loads back."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import LabelJudge

from hftlab.config import load_config
from hftlab.defenses import DEFENSES
from hftlab.judges import JUDGES
from hftlab.pipeline import run_pipeline
from hftlab.stage_models import finetuned_model

# Settings a defense needs to have anything to do on the tiny run: the keyword judge flags every
# benign SST-2 answer, so the guardrail screens with a label judge instead.
EXTRA = {"guardrail": ["defense_args={judge: test_label}"],
         # TAR's default retain rows are Alpaca files under data_root; the demo pack stands in
         "tar": ["defense_args={retain_data: {kind: demo_sentiment, n: 16}}"]}


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_runs_every_stage(name: str, tiny_overrides, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(JUDGES._items, "test_label", LabelJudge)
    config = load_config(None, [*tiny_overrides, f"defense={name}", *EXTRA.get(name, []),
                                "provider_harmful={kind: demo_harmful_qa, n: 16}",
                                "finetune.train.max_steps=3", "alignment.train.max_steps=2"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    from hftlab.context import RunContext

    ctx = RunContext(config, run)
    tuned = finetuned_model(ctx)
    lora = {n: p for n, p in tuned.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at zero
    base = ctx.base_model()
    merged = tuned.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(base.named_parameters(), merged.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(base.parameters(), merged.parameters()))


@pytest.mark.parametrize(
    "name", [n for n in DEFENSES.names() if DEFENSES.get(n).needs_alignment_data]
)
def test_defenses_that_train_on_alignment_data_need_it(name: str, tiny_overrides) -> None:
    from hftlab.config import ConfigError
    from hftlab.context import RunContext

    config = load_config(None, [*tiny_overrides, f"defense={name}", "alignment.enabled=false"])
    with pytest.raises(ConfigError, match="alignment.enabled"):
        RunContext(config, config.resolved_cache_dir() / "run")
