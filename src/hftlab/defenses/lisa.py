"""Lisa: lazy safety alignment by bi-state optimisation during fine-tuning (Huang et al. 2024,
Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack,
arXiv 2405.18641).

The provider keeps training on its alignment data while it fine-tunes on the user's data: the
optimiser alternates between an alignment state (``alignment_step`` steps on alignment batches)
and a fine-tuning state (``finetune_step`` steps on the user's batches), and each state is pulled
back towards the point where it started with a proximal term

    L_state(w) + ρ/2 · ‖w − w̃‖²,   ∇ = ∇L_state(w) + ρ · (w − w̃),

where w̃ are the weights at the last switch between the states (the other state's final
weights), so neither state drifts far from the consensus of the two.

Follows git-disl/Lisa ``trainer.py`` (``ADMMTrainer``: ``init``, ``check_mode``,
``switch_model``, ``training_step``) and ``script/finetune/lisa_poison_ratio.sh``:

- schedule (``check_mode``): the run starts in the alignment state (when ``alignment_step`` > 0
  and alignment data exist), and a state is left after it has run its number of steps, so step
  s (0-based) is an alignment step iff s mod (alignment_step + finetune_step) < alignment_step;
  ``alignment_step`` = 0 means fine-tuning only, ``finetune_step`` = 0 alignment only (the
  reference never switches then). Reference script: 100 alignment / 900 fine-tuning steps
  (``train.py``'s argparse defaults are 500 / 500), ρ = 1 (argparse default 0.1; the Booster
  repository's Lisa baseline script uses 0.01), 10 000 alignment rows (``guide_data_num``).
- snapshots (``switch_model``): both start as the weights at the start of the stage; at a
  switch the weights of the state being left are stored (alignment → fine-tuning: the
  "alignment weights"; fine-tuning → alignment: the "fine-tuning weights"), and each state's
  proximal term uses the other state's stored weights. Since the other state's weights are
  always the ones stored at the most recent switch, one copy (``anchor``) is kept here.
- proximal term on (``training_step``) only when ``steps > 0.1 · len(train_dataloader) ·
  num_train_epochs``, i.e. strictly after the first 10 % of the run's steps ("proximal term
  will hurt convergence" early, per the reference's comment); ``proximal_after`` = 0.1.
- data: in an alignment step the trainer's user batch is REPLACED by an alignment batch (the
  reference's ``check_mode`` returns ``sample_from_alignment()`` instead of ``inputs``): the
  user batch drawn for that step is not used, and the user data loader still advances, so in
  each cycle ``alignment_step`` of the user's batches are skipped (reported as
  ``user_batches_unused``). Alignment batches have the stage's batch size (the reference's
  ``_train_batch_size``), from a fresh seeded shuffle on every pass (``RandomSampler`` and a
  re-created iterator).

Step counts: the reference counts ``training_step`` calls (micro-batches; its scripts use
``gradient_accumulation_steps`` 1, so they are optimizer steps). Here the state and the
proximal rule follow the trainer's optimizer step (``trainer.step``): equal at grad_accum 1, and
with grad_accum > 1 all micro-batches of one optimizer step are in the same state (the
reference would switch in the middle of an accumulated step and snapshot weights that the
optimizer had not moved yet).

CPU preset: ``CPU_PRESET`` = ``{alignment_step: 3, finetune_step: 22}`` (pass it as
``defense_args``). The reference's 1000-step cycle is one epoch of its user data (5000 rows at
batch size 5) and runs 20 times; configs/cpu_sst2.yaml fine-tunes 125 steps (5 epochs of 25),
where 100/900 would spend the first 100 steps on alignment and fine-tune only 25. The preset
keeps one cycle per epoch (25 steps) with the alignment share rounded from 10 % to 3 steps (12 %):
over 125 steps 15 alignment and 110 fine-tuning steps in 5 cycles; ρ and the 10 % rule unchanged.

Departures from the reference, and why:

- The alignment data are the run's ``alignment.data`` (the refusals the provider aligned on),
  not BeaverTails' ``is_safe`` rows.
- The 10 % threshold is taken of the stage's planned optimizer steps (``trainer.total_steps``, which
  honours ``max_steps``); the reference uses ``len(train_dataloader) · num_train_epochs`` even
  when ``max_steps`` cuts the run short.
- The proximal gradient ρ · (w − w̃) / grad_accum is written into ``.grad`` directly instead of
  adding ρ/2·‖w − w̃‖² to the loss (same gradient, no autograd graph over every weight); it is
  scaled like the loss, so one optimizer step gets ρ · (w − w̃) once; gradients of earlier
  micro-batches are kept.

Returned per micro-batch: ``loss`` is the cross-entropy of the batch trained on (alignment or
user), ``proximal`` the value ρ/2·‖w − w̃‖² (0 while off) and ``alignment_state`` 1 or 0.
Cost: one forward-backward per step as plain SFT, plus one copy of the trainable weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.common import BatchStream, alignment_stream

if TYPE_CHECKING:
    from hftlab.train import Batch, SFTTrainer

ALIGN_STATE, FINETUNE_STATE = "alignment", "finetune"
CPU_PRESET: dict[str, Any] = {"alignment_step": 3, "finetune_step": 22}


def lisa_state(step: int, alignment_step: int, finetune_step: int) -> str:
    """The state of optimizer step ``step`` (0-based): cycles of ``alignment_step`` alignment
    steps then ``finetune_step`` fine-tuning steps, starting with alignment."""
    if alignment_step == 0:
        return FINETUNE_STATE
    if finetune_step == 0:
        return ALIGN_STATE
    in_cycle = step % (alignment_step + finetune_step)
    return ALIGN_STATE if in_cycle < alignment_step else FINETUNE_STATE


def squared_distance(diffs: list[torch.Tensor]) -> float:
    """Σ ‖d‖² over the tensors: float32 sums per tensor, read back at once and added in order
    in Python (as a loop of ``float(d.pow(2).sum())`` would)."""
    if not diffs:
        return 0.0
    return sum(torch.stack([d.float().pow(2).sum() for d in diffs]).tolist(), 0.0)


@DEFENSES.register("lisa")
class Lisa(Defense):
    summary = "fine-tuning stage: alternate alignment and user steps with a proximal term (ρ)"
    paper = (
        "Huang et al. 2024, Lisa: Lazy Safety Alignment for Large Language Models against "
        "Harmful Fine-tuning Attack, arXiv 2405.18641"
    )
    reference = "git-disl/Lisa trainer.py (ADMMTrainer), script/finetune/lisa_poison_ratio.sh"
    stages = (FINETUNE,)
    multi_process = "its proximal gradient is added to .grad once per process"
    resume_attributes = (
        "alignment", "anchor", "state", "steps",
        "user_batches_unused", "proximal_steps", "switch_drift", "_last_step",
    )
    needs_alignment_data = True

    reference_settings = (
        ReferenceSetting("defense_args.alignment_step", 100,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "CPU: one 25-step cycle per epoch (lisa.CPU_PRESET)"),
        ReferenceSetting("defense_args.finetune_step", 900,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "CPU: one 25-step cycle per epoch (lisa.CPU_PRESET)"),
        ReferenceSetting("defense_args.rho", 1.0,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh"),
        ReferenceSetting("defense_args.proximal_after", 0.1,
                         "git-disl/Lisa trainer.py (ADMMTrainer.training_step)"),
        ReferenceSetting("alignment.data", "10000 BeaverTails is_safe pairs (guide_data_num)",
                         "git-disl/Lisa train.py (SupervisedDataset), lisa_poison_ratio.sh",
                         "hftlab: the provider's refusals; CPU time"),
        ReferenceSetting("alignment.train.lr", 0.001, "git-disl/Lisa script/alignment/SFT.sh",
                         "calibrated for the 135M model (cpu_sst2_ref.yaml)"),
        ReferenceSetting("alignment.train.epochs", 30, "git-disl/Lisa script/alignment/SFT.sh",
                         "CPU time"),
        ReferenceSetting("alignment.train.batch_size", 5, "git-disl/Lisa script/alignment/SFT.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("alignment.train.weight_decay", 0.1,
                         "git-disl/Lisa script/alignment/SFT.sh", "CPU protocol: no weight decay"),
        ReferenceSetting("alignment.train.warmup_ratio", 0.1,
                         "git-disl/Lisa script/alignment/SFT.sh", "hftlab: no warm-up"),
        ReferenceSetting("alignment.train.schedule", "cosine",
                         "git-disl/Lisa script/alignment/SFT.sh",
                         "hftlab: constant (Booster's scripts)"),
        ReferenceSetting("alignment.train.lora.r", 16, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.alpha", 4, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.target_modules",
                         ["q_proj", "k_proj", "v_proj", "o_proj",
                          "up_proj", "down_proj", "gate_proj"],
                         "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("alignment.train.lora.dropout", 0.1, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: no dropout"),
        ReferenceSetting("finetune.n", 5000, "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "CPU time"),
        ReferenceSetting("finetune.poison_ratio", 0.1,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh"),
        ReferenceSetting("finetune.train.lr", 1e-5,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "calibrated: 1e-5 does not move the 135M model in 100 steps"),
        ReferenceSetting("finetune.train.epochs", 20,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh", "CPU time"),
        ReferenceSetting("finetune.train.batch_size", 5,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "hftlab: Booster's batch 10; CPU: 8"),
        ReferenceSetting("finetune.train.weight_decay", 0.0,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh"),
        ReferenceSetting("finetune.train.warmup_ratio", 0.0,
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh",
                         "effective value: HF's constant schedule ignores the script's "
                         "--warmup_ratio 0.1"),
        ReferenceSetting("finetune.train.schedule", "constant",
                         "git-disl/Lisa script/finetune/lisa_poison_ratio.sh"),
        ReferenceSetting("finetune.train.max_length", 2048,
                         "git-disl/Lisa train.py (model_max_length default)",
                         "hftlab: 256 (Booster's train.py)"),
        ReferenceSetting("finetune.train.lora.r", 8, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.alpha", 4, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "v_proj"],
                         "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: Booster's adapter (r 32, α 4, q/k/v); CPU: r 8, α 16, all "
                         "linear"),
        ReferenceSetting("finetune.train.lora.dropout", 0.1, "git-disl/Lisa train.py (LoraConfig)",
                         "hftlab: no dropout"),
    )

    @dataclass
    class Options:
        alignment_step: int = 100  # steps per alignment state (reference script: 100)
        finetune_step: int = 900  # steps per fine-tuning state (reference script: 900)
        rho: float = 1.0  # proximal intensity ρ (reference script: RHO=1)
        proximal_after: float = 0.1  # proximal term on after this share of the steps (0.1)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if o.alignment_step < 0 or o.finetune_step < 0:
            raise ConfigError("defense_args.alignment_step/finetune_step of 'lisa' must be >= 0")
        if o.alignment_step == 0 and o.finetune_step == 0:
            raise ConfigError("defense 'lisa' needs alignment_step or finetune_step > 0")
        if o.rho < 0:
            raise ConfigError("defense_args.rho of 'lisa' must be >= 0")
        if not 0.0 <= o.proximal_after <= 1.0:
            raise ConfigError("defense_args.proximal_after of 'lisa' must be in [0, 1]")
        self.alignment: BatchStream | None = None
        self.anchor: list[torch.Tensor] = []  # w̃: the weights at the last switch
        self.state = ALIGN_STATE
        self.proximal_threshold = 0.0
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.steps = {ALIGN_STATE: 0, FINETUNE_STATE: 0}  # optimizer steps per state
        self.user_batches_unused = 0
        self.proximal_steps = 0
        self.switch_drift: list[float] = []  # ‖w − w̃‖² at each switch (reference prints it)
        self._last_step = -1

    def setup(self, stage: str, trainer: SFTTrainer) -> None:
        if stage != FINETUNE:
            return
        o = self.options
        if o.alignment_step > 0:
            self.alignment = alignment_stream(trainer, trainer.cfg.batch_size, self.name)
        self.anchor = [p.detach().clone() for p in trainer.trainable_parameters()]
        self.state = lisa_state(0, o.alignment_step, o.finetune_step)
        self.proximal_threshold = o.proximal_after * trainer.total_steps
        self._reset_counts()

    def switch(self, params: list[torch.nn.Parameter], state: str) -> None:
        """Enter ``state``: the weights of the state being left become w̃."""
        with torch.no_grad():
            drift = squared_distance(torch._foreach_sub([p.detach() for p in params],
                                                        self.anchor))
            self.anchor = [p.detach().clone() for p in params]
        self.switch_drift.append(drift)
        self.state = state

    def training_step(self, stage: str, trainer: SFTTrainer, batch: Batch) -> dict[str, float]:
        if stage != FINETUNE:
            return super().training_step(stage, trainer, batch)
        o = self.options
        params = trainer.trainable_parameters()
        step = trainer.step
        state = lisa_state(step, o.alignment_step, o.finetune_step)
        if state != self.state:
            self.switch(params, state)
        if step != self._last_step:
            self.steps[state] += 1
            self._last_step = step
        if state == ALIGN_STATE:
            assert self.alignment is not None
            batch = self.alignment.next()  # the user's batch of this step is not used
            self.user_batches_unused += 1
        loss = trainer.compute_loss(batch)
        trainer.backward(loss)
        proximal = 0.0
        if o.rho > 0 and step > self.proximal_threshold:
            proximal = self.add_proximal_grad(params, o.rho / trainer.cfg.grad_accum)
            self.proximal_steps += 1
        return {"loss": float(loss.detach()), "proximal": proximal,
                "alignment_state": float(state == ALIGN_STATE)}

    def add_proximal_grad(self, params: list[torch.nn.Parameter], scale: float) -> float:
        """.grad += scale · (w − w̃); returns ρ/2·‖w − w̃‖² (ρ = scale · grad_accum)."""
        with torch.no_grad():
            diffs = torch._foreach_sub([p.detach() for p in params], self.anchor)
            total = squared_distance(diffs)
            have = [i for i, p in enumerate(params) if p.grad is not None]
            if have:
                torch._foreach_add_([params[i].grad for i in have], [diffs[i] for i in have],
                                    alpha=scale)
            for p, diff in zip(params, diffs):
                if p.grad is None:
                    p.grad = scale * diff
        return self.options.rho / 2 * total

    def report(self, stage: str) -> dict[str, object]:
        """The state schedule as it ran (optimizer steps per state) and the proximal rule."""
        if stage != FINETUNE:
            return {}
        o = self.options
        drift = self.switch_drift
        return {
            "alignment_step": o.alignment_step,
            "finetune_step": o.finetune_step,
            "alignment_steps": self.steps[ALIGN_STATE],
            "finetune_steps": self.steps[FINETUNE_STATE],
            "user_batches_unused": self.user_batches_unused,
            "switches": len(drift),
            "proximal_from_step": math.floor(self.proximal_threshold) + 1,
            "proximal_micro_batches": self.proximal_steps,
            "switch_drift_last": round(drift[-1], 6) if drift else None,
        }
