"""Every registered defense either runs data-parallel (multi_process True: exercised by
tests/test_distributed.py, or it adds nothing to the trainer's step) or gives the one-line reason
a multi-process run refuses it."""

from __future__ import annotations

import pytest

from hftlab.config import ConfigError
from hftlab.defenses import DEFENSES, Defense
from hftlab.distributed import check_multi_process

# run with 2 processes by tests/test_distributed.py: one per stage, and the baseline
EXERCISED = {"sft", "vaccine", "ewc", "antidote"}
TRAINING_HOOKS = ("setup", "loss", "training_step")


@pytest.mark.parametrize("name", DEFENSES.names())
def test_distributed_contract(name: str) -> None:
    cls = DEFENSES.get(name)
    declared = cls.multi_process
    if declared is True:
        own_hooks = [h for h in TRAINING_HOOKS if getattr(cls, h) is not getattr(Defense, h)]
        assert name in EXERCISED or not own_hooks, (
            f"{name} changes the training step ({own_hooks}) but no 2-process test runs it")
        check_multi_process(cls(), 2)
    else:
        assert isinstance(declared, str) and declared.strip() and "\n" not in declared
        with pytest.raises(ConfigError, match=f"defense '{name}' cannot run data-parallel"):
            check_multi_process(cls(), 2)
    check_multi_process(cls(), 1)  # one process: every defense runs


def test_distributed_contract_covers_every_stage() -> None:
    stages = {s for name in EXERCISED for s in DEFENSES.get(name).stages}
    assert {"alignment", "finetune", "post_finetune"} <= stages
