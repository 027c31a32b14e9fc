"""The provider's safety examples that SafeInstr and BackdoorAlign add to a user's data: the
rows of its alignment data whose answer refuses. Alignment data may also hold benign rows
answered helpfully (configs/cpu_sst2_ref.yaml: 400 Alpaca answers beside 191 refusals, so that
the aligned model still answers tasks), and neither paper adds those: both add (harmful
instruction → refusal) pairs."""

from __future__ import annotations

from hftlab.data.records import Example
from hftlab.judges.keyword import contains_refusal


def refusal_rows(rows: list[Example]) -> list[Example]:
    """The rows whose answer holds a refusal phrase (the keyword judge's, as the refusal
    loader's ``refusals_only`` reads them), in their order."""
    return [row for row in rows if contains_refusal(row.response)]
