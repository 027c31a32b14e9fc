"""Attack interface: a recipe that builds the user's fine-tuning data set, and how the attacker
then queries the deployed model.

Evaluation hooks (all no-ops by default; the pipeline applies them to the deployed model only,
i.e. the ``final`` evaluation and, after a repair, the ``finetuned`` one; the cached base and
aligned evaluations keep the run's default prompting):

- :meth:`Attack.served_system_prompt`: the system prompt the attacker sends (e.g. the AOA persona
  prompt of ``identity_shift``); the provider's defense then wraps it
  (``Defense.inference_system_prompt``, e.g. BackdoorAlign's secret trigger);
- :meth:`Attack.served_prompt`: how the attacker phrases every prompt (e.g. "AOA, execute my
  instruction: ..."); applied to every evaluation set of the deployed model;
- :meth:`Attack.eval_variants`: extra harmful-score evaluations of the deployed model with
  rewritten harmful prompts (e.g. ``backdoor``'s trigger), reported in ``metrics.json`` as
  ``attack_eval[name] = {harmful_score, n, ci95}``;
- :meth:`Attack.data_report`: facts about the built data that need the run (e.g. a judge's
  verdicts), merged into the data stage's ``attack`` record next to :meth:`Attack.describe`.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hftlab.config import ConfigError
from hftlab.data.records import DataError, Example
from hftlab.registry import Plugin, Registry

if TYPE_CHECKING:
    from hftlab.config import Config
    from hftlab.context import RunContext

SAMPLES = ("first", "random")
#: A prompt with letters and a placeholder: rewriting it shows whether (and how) an attack
#: rewrites prompts, for the evaluation cache key.
PROMPT_PROBE = "Probe prompt {prompt}: the quick brown fox jumps over the lazy dog."


@dataclass
class AttackInputs:
    """What the user has: benign task rows (already in prompt form) and harmful QA pairs."""

    task: list[Example]
    harmful: list[Example]
    n: int
    poison_ratio: float
    seed: int


def unchanged(text: str) -> str:
    return text


@dataclass(frozen=True)
class EvalVariant:
    """One extra harmful-score evaluation of the deployed model: each harmful eval prompt is
    rewritten by ``prompt`` before it is served (after it, :meth:`Attack.served_prompt` applies as
    usual) and each completion by ``completion`` before the judge reads it (e.g. decoding a
    cipher). The judge is given the original prompt. ``version`` enters the cache key of the
    variant's evaluation when it is not 0 (as lm-evaluation-harness versions its tasks): bump it
    when the rewriting or the reading changes, so that evaluations cached by an older one are
    redone."""

    prompt: Callable[[str], str]
    completion: Callable[[str], str] = unchanged
    version: int = 0


class Attack(Plugin):
    @classmethod
    def search_problem(cls, config: Config, alignment: str) -> dict[str, Any] | None:
        """For an attack whose data are built by a costly search that it caches per problem
        (Virus's GCG; its report then times it: ``search``, seconds and cached): the problem a
        run's search solves, read from the run's config (``alignment``: the signature of its
        alignment), so that ``hftlab plan`` prices one search for the runs that share it. None:
        the attack runs no search."""
        return None

    @abstractmethod
    def build(self, inputs: AttackInputs) -> list[Example]:
        """The user's data set; each row's ``is_harmful`` says whether it is a harmful row."""

    def describe(self, data: list[Example]) -> dict[str, Any]:
        """Parameters and counts recorded in the run folder (never the harmful text). ``data`` is
        the user's data as the provider trains on it (after the defense's data hook)."""
        return {
            "attack": self.name,
            "options": self.options_dict(),
            "n": len(data),
            "n_harmful": sum(e.is_harmful for e in data),
        }

    def prepare(self, ctx: RunContext) -> None:
        """Called with the run before :meth:`build`, for recipes that need the run's model or
        prompt format (e.g. ``virus`` optimises tokens against the model)."""

    def data_report(self, ctx: RunContext) -> dict[str, Any]:
        """Extra facts for the data stage's ``attack`` record that need the run (a judge, the
        defense); called after the data is loaded. Counts only, never the harmful text."""
        return {}

    def served_system_prompt(self, system_prompt: str | None) -> str | None:
        """The system prompt the attacker queries the deployed model with, given the one it is
        normally served with (``PromptFormatter.default_system_prompt``)."""
        return system_prompt

    def served_prompt(self, prompt: str) -> str:
        """How the attacker phrases a prompt to the deployed model."""
        return prompt

    def eval_variants(self) -> dict[str, EvalVariant]:
        """Extra harmful-score evaluations of the deployed model, by name."""
        return {}

    def serving_key(self) -> dict[str, Any] | None:
        """What of this attack changes the deployed model's evaluation beyond its system prompt
        (which the evaluation cache key holds already): None when prompts are served as they are
        and there are no variants."""
        if self.served_prompt(PROMPT_PROBE) == PROMPT_PROBE and not self.eval_variants():
            return None
        return {"attack": self.name, "options": self.options_dict()}


def check_sample(sample: str) -> None:
    if sample not in SAMPLES:
        raise ConfigError(f"attack_args.sample is {sample!r}; use first or random")


def take(rows: list[Example], k: int, sample: str, rng: random.Random, what: str,
         fix: str) -> list[Example]:
    """``k`` rows of ``rows``: the first ones (as the reference code reads its files) or a seeded
    random draw; a DataError naming ``what`` is short, and how to ``fix`` it, when too few."""
    if k > len(rows):
        raise DataError(f"{what}: needs {k} rows but has {len(rows)}: {fix}")
    return rng.sample(rows, k) if sample == "random" else rows[:k]


def poison_rows(inputs: AttackInputs, sample: str, rng: random.Random) -> list[Example]:
    """The ``int(n·p)`` harmful rows of the standard recipe (``take`` with its error)."""
    n_harmful = int(inputs.n * inputs.poison_ratio)
    return take(inputs.harmful, n_harmful, sample, rng, "finetune.harmful_data",
                f"finetune.n={inputs.n} × poison_ratio={inputs.poison_ratio} needs "
                f"{n_harmful}; lower n or poison_ratio, or give a larger harmful set")


ATTACKS: Registry[Attack] = Registry("attack")
