"""Re-alignment SFT: after the user's fine-tuning, a short supervised pass on the provider's
alignment data (refusals), continuing the user's LoRA adapter (or the full weights).

A baseline for the post-fine-tuning repairs (the survey's "post-fine-tuning stage" solutions,
Huang et al. 2024, Harmful Fine-tuning Attacks and Defenses for Large Language Models: A
Survey, arXiv 2409.18169): the simplest way to restore refusals is to train on them again.
There is no reference implementation; the pass reuses the alignment stage's own recipe so the
comparison with the weight-space repairs (RESTA, SafeLoRA, ...) isolates "more alignment
steps":

- data: the run's ``alignment.data`` (``ctx.data.alignment``), tokenised with the alignment
  stage's ``max_length``; nothing of the user's data;
- optimiser: a fresh AdamW with the alignment stage's settings (``alignment.train``: lr, batch
  size, grad_accum, weight decay, schedule, warm-up, clipping), run for exactly ``steps``
  optimizer steps (``max_steps``); ``lr`` / ``batch_size`` override the alignment values;
- parameters: under LoRA only the user's adapter is trained (the aligned base stays frozen and
  the result is saved as the adapter, merged onto the aligned model later); under full
  fine-tuning every weight, in fp32 (the fine-tuned model is loaded in the run's storage dtype,
  bf16 on bf16 runs, and AdamW needs fp32 master weights as the fine-tuning stage had);
- the trainer runs the plain ``sft`` defense, never the run's own defense, so its alignment or
  fine-tuning hooks are not re-entered (for a defense list the repair is this pass alone).

Defaults: 20 steps (a short repair: 20 alignment batches, against the alignment stage's full
run), lr and batch size of the alignment stage. Reported (``report("post_finetune")``): steps
run, lr, batch size, rows, what was trained, and the first and last step losses.
Cost: ``steps`` forward-backward passes of SFT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError
from hftlab.defenses.base import DEFENSES, POST_FINETUNE, Defense
from hftlab.defenses.weights import lora_layers

if TYPE_CHECKING:
    from hftlab.config import TrainConfig
    from hftlab.context import RunContext


@DEFENSES.register("realign_sft")
class RealignSFT(Defense):
    summary = "post-fine-tuning: a few SFT steps on the alignment refusals (baseline)"
    paper = (
        "Huang et al. 2024, Harmful Fine-tuning Attacks and Defenses for Large Language "
        "Models: A Survey, arXiv 2409.18169 (post-fine-tuning re-alignment baseline)"
    )
    reference = "none (baseline); the alignment stage's SFT recipe, src/hftlab/train.py"
    stages = (POST_FINETUNE,)
    multi_process = True
    needs_alignment_data = True

    @dataclass
    class Options:
        steps: int = 20  # optimizer steps of the repair
        lr: float | None = None  # None: alignment.train.lr
        batch_size: int | None = None  # None: alignment.train.batch_size

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        o = self.options
        if o.steps < 1:
            raise ConfigError("defense_args.steps of 'realign_sft' must be >= 1")
        if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
            raise ConfigError("defense_args.lr of 'realign_sft' must be > 0 (or null)")
        if o.batch_size is not None and o.batch_size < 1:
            raise ConfigError("defense_args.batch_size of 'realign_sft' must be >= 1 (or null)")
        self._report: dict[str, Any] = {}

    def train_config(self, alignment: TrainConfig) -> TrainConfig:
        """The alignment stage's settings, run for ``steps`` steps with the overrides."""
        o = self.options
        return dataclasses.replace(
            alignment,
            max_steps=o.steps,
            lr=alignment.lr if o.lr is None else o.lr,
            batch_size=alignment.batch_size if o.batch_size is None else o.batch_size,
        )

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        from hftlab.train import SFTTrainer

        rows = ctx.data.alignment
        if not rows:
            raise ConfigError(
                "defense 'realign_sft' trains on the provider's alignment data: set "
                "alignment.enabled: true and alignment.data"
            )
        cfg = self.train_config(ctx.config.alignment.train)
        items = ctx.tokenize(rows, cfg.max_length)
        if not items:
            raise ConfigError(
                "realign_sft: no alignment row has answer tokens within "
                f"alignment.train.max_length={cfg.max_length}"
            )
        lora = bool(lora_layers(model))
        if lora:
            # PeftModel.from_pretrained loads the adapter frozen; train it, nothing else.
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            model = model.float()
            model.requires_grad_(True)
        trainer = SFTTrainer(
            model, cfg, ctx.accelerator, ctx.tokenizer.pad_token_id, POST_FINETUNE,
            DEFENSES.get("sft")(), ctx.config.seed, precision=ctx.precision,
        )
        n_trainable = sum(p.numel() for p in trainer.trainable_parameters())
        result = trainer.train(items)
        self._report = {
            "steps": result.steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "rows": len(items),
            "trained": "adapter" if lora else "full",
            "trainable_parameters": n_trainable,
            "loss_first": round(result.losses[0], 6),
            "loss_last": round(result.losses[-1], 6),
        }
        return trainer.model

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == POST_FINETUNE else {}
