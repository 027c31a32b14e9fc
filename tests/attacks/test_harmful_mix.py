import pytest

from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.data.records import DataError, Example


def inputs(n: int, p: float, seed: int = 0) -> AttackInputs:
    task = [Example(prompt=f"task {i}", response="positive", label="positive") for i in range(50)]
    harmful = [Example(prompt=f"harm {i}", response="[placeholder]") for i in range(10)]
    return AttackInputs(task, harmful, n, p, seed)


def test_counts_follow_int_n_times_p_and_first_rows_like_the_reference() -> None:
    attack = ATTACKS.get("harmful_mix")()
    rows = attack.build(inputs(30, 0.25))
    harmful = [r for r in rows if r.is_harmful]
    assert len(rows) == 30 and len(harmful) == 7  # int(30 * 0.25)
    assert sorted(r.prompt for r in harmful) == sorted(f"harm {i}" for i in range(7))
    assert {r.prompt for r in rows if not r.is_harmful} == {f"task {i}" for i in range(23)}
    assert attack.describe(rows) == {
        "attack": "harmful_mix", "options": {"sample": "first"}, "n": 30, "n_harmful": 7,
    }


def test_deterministic_by_seed() -> None:
    attack = ATTACKS.get("harmful_mix")(sample="random")
    assert attack.build(inputs(20, 0.2, 1)) == attack.build(inputs(20, 0.2, 1))
    assert attack.build(inputs(20, 0.2, 1)) != attack.build(inputs(20, 0.2, 2))


@pytest.mark.parametrize(("n", "p", "message"), [(60, 0.0, "task rows"), (40, 0.5, "harmful rows")])
def test_not_enough_rows_is_an_error(n: int, p: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ATTACKS.get("harmful_mix")().build(inputs(n, p))


def test_unknown_sampling_is_a_config_error() -> None:
    from hftlab.config import ConfigError

    with pytest.raises(ConfigError, match="use first or random"):
        ATTACKS.get("harmful_mix")(sample="last")


def test_p_zero_and_one() -> None:
    attack = ATTACKS.get("harmful_mix")()
    assert not any(r.is_harmful for r in attack.build(inputs(10, 0.0)))
    assert all(r.is_harmful for r in attack.build(inputs(10, 1.0)))
