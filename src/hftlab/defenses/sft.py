"""No defense: plain supervised fine-tuning in every stage (the survey's SFT baseline)."""

from __future__ import annotations

from hftlab.defenses.base import DEFENSES, Defense


@DEFENSES.register("sft")
class SFT(Defense):
    """Plain SFT: alignment on refusal data, then the user's fine-tuning, no protection."""

    summary = "no defense: plain SFT alignment and fine-tuning (the baseline)"
    paper = "Huang et al. 2024, Harmful Fine-tuning Attacks and Defenses for LLMs: A Survey"
    reference = "git-disl/Booster script/alignment/sft.sh (alignment), trainer.py (SFT baseline)"
    multi_process = True  # tests/test_distributed.py trains it with 2 processes
