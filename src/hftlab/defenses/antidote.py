"""Antidote: post-fine-tuning safety alignment by one-shot pruning (Huang et al. 2024,
arXiv 2408.09600).

After the user's fine-tuning, the provider removes the weights that matter most for producing
harmful answers. The importance of weight W_ij of a linear layer is the Wanda score

    S_ij = |W_ij| · ‖X_j‖₂,

with X_j the j-th input feature of that layer over every non-padding token (prompt and answer)
of the provider's harmful QA, run through the fine-tuned model. In each output row i (Wanda's
comparison group) the ``dense_ratio`` fraction of highest-scored weights is set to zero; the rest
is kept as it is.

Follows git-disl/Antidote ``utils.py`` (``prune_wanda_outlier`` with
``prepare_calibration_input``, ``WrappedGPT``, ``find_layers``), ``trainer.py``
(``AntidoteTrainer.save_mask``) and ``train.py`` (the ``antidote`` branch that applies
``param *= 1 - bad_mask``):

- which weights: the reference loads the aligned adapter merged into the base model and the
  fine-tuning adapter on top (``--lora_folder2``, unmerged), and ``find_layers`` picks every
  ``nn.Linear`` whose name contains "lora" inside the decoder blocks, i.e. the fine-tuning
  adapter's ``lora_A`` and ``lora_B`` factors, not the merged weight. So under LoRA this prunes
  A [r × in] and B [out × r] separately, each scored with its own input: A's input is the
  layer's input X, B's input is A·X (PEFT applies the LoRA scale after B, and a uniform factor
  on B's inputs would not change a per-row ranking anyway). Under full fine-tuning
  (``full_finetuning == "True"``) the reference prunes the full q_proj, k_proj and v_proj
  weights of every block; so does this.
- the mask: per row a stable ascending sort of S; the first ``int(cols · (1 − dense_ratio))``
  are kept, the remaining (top-scored) columns are zeroed. Ties go as in the stable sort.
- the activations: ``WrappedGPT.add_batch`` accumulates Σ x_j² in fp32 over all tokens of the
  calibration rows (the reference's running mean divides by the row count, a factor per layer
  that leaves the ranking unchanged). The reference re-runs each block on the previous block's
  output without applying any mask until the end, which is one forward pass of the unpruned
  fine-tuned model; that is what is done here, with forward hooks.
- the pruned adapter: the reference fine-tunes a fresh LoRA of rank 256, α 4 on q, k, v, no
  dropout (``train.py``: the second ``LoraConfig`` on the merged aligned model) and prunes that.
  The rank matters: the mask keeps ``int(cols · (1 − dense_ratio))`` columns per row, so on B
  [out × r] a rank-8 adapter keeps int(7.2) = 7 of 8 (12.5 % instead of 10 %, and every row loses
  its top entry) where rank 256 keeps 230 of 256. ``finetune_lora`` (default ``antidote``, a
  ``LORA_PRESETS`` name) makes the fine-tuning stage train that adapter (:meth:`finetune_train`;
  the stage's other settings are the run's); ``null`` keeps ``finetune.train.lora``. Under full
  fine-tuning it changes nothing. The reference's SFT baseline (``script/finetune/
  sft_poison_ratio.sh``) runs the same ``train.py`` fine-tuning command, so it fine-tunes the same
  rank-256 adapter (its output folder is the one Antidote then prunes): a like-for-like SFT
  baseline for Antidote sets ``finetune.train.lora: {preset: antidote}``.
- defaults: ``dense_ratio`` 0.1 (``train.py --dense_ratio`` default and
  ``script/finetune/antidote_poison_ratio.sh``); 2000 calibration rows (``bad_sample_num=2000``
  passed as ``--sample_num`` with ``--poison_ratio 1``: the first 2000 unsafe BeaverTails rows
  after index 5000, disjoint from the fine-tuning data). Here: the first ``calibration_rows``
  rows of ``provider_harmful`` (all of them when fewer). ``reference_settings`` lists the
  reference run's settings (its alignment adapter is rank 256 too: ``train.py``'s first
  ``LoraConfig``; the aligned adapter is merged before fine-tuning and is not pruned).

Departures: calibration rows are run in padded batches of ``CALIBRATION_BATCH`` with padding
positions left out of the statistics (the reference runs one unpadded row at a time; the
statistics are the same up to rounding); rows are tokenised with the run's prompt format and
truncated to ``finetune.train.max_length`` (the reference uses its Alpaca template, 2048
tokens). ``modules`` can narrow the pruned layers (not a reference option). The reference's
calibration-free branch (``sample_num == 0``: plain magnitude) is not offered: the provider's
harmful QA is required.

Cost: one no-grad forward pass over the calibration rows and a sort per pruned weight; the
rank-256 fine-tuning adapter trains 2·256·(d_in + d_out) weights per adapted module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hftlab.config import ConfigError, TrainConfig, lora_preset
from hftlab.defenses.base import DEFENSES, POST_FINETUNE, Defense, ReferenceSetting
from hftlab.defenses.weights import ADAPTER, layer_index, lora_layers, plain_name
from hftlab.train import collate

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.formatting import Tokenized

TRAIN_PY = "git-disl/Antidote train.py"
SCRIPT = "git-disl/Antidote script/finetune/antidote_poison_ratio.sh"
ALIGN_SCRIPT = "git-disl/Antidote script/alignment/sft.sh"
CALIBRATION_BATCH = 8  # rows per no-grad forward; the statistics do not depend on it
FULL_FT_MODULES = ("q_proj", "k_proj", "v_proj")  # reference find_layers, full_finetuning


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, dense_ratio: float
               ) -> torch.Tensor:
    """True where a weight is pruned: per output row, the columns past the first
    ``int(cols · (1 − dense_ratio))`` of a stable ascending sort of |W_ij| · ‖X_j‖₂."""
    score = weight.detach().float().abs() * input_norm.float().reshape(1, -1)
    cols = score.shape[1]
    keep = int(cols * (1 - dense_ratio))
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, keep:], True)
    return mask


def pruning_targets(model: torch.nn.Module, modules: list[str] | None
                    ) -> tuple[str, dict[str, torch.nn.Linear]]:
    """("lora" or "full", {name: linear layer to prune}) inside the decoder blocks: the LoRA
    factors ``<module>.lora_A`` / ``<module>.lora_B`` of every adapted module, or under full
    fine-tuning the ``modules`` (default q/k/v projections) themselves."""
    adapted = lora_layers(model)
    if adapted:
        targets = {}
        for name, layer in adapted.items():
            if layer_index(name) is None or (
                    modules is not None and name.rsplit(".", 1)[-1] not in modules):
                continue
            targets[f"{name}.lora_A"] = layer.lora_A[ADAPTER]
            targets[f"{name}.lora_B"] = layer.lora_B[ADAPTER]
        return "lora", targets
    wanted = tuple(modules) if modules is not None else FULL_FT_MODULES
    full = {plain_name(name): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and layer_index(plain_name(name)) is not None
            and name.rsplit(".", 1)[-1] in wanted}
    return "full", full


@contextmanager
def input_sums(targets: dict[str, torch.nn.Module], keep: list[torch.Tensor | None]
               ) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each target's input Σ x_j² over the positions where ``keep[0]`` (the
    current batch's attention mask) is set is added up in fp32, per input feature."""
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            rows = x[keep[0]] if keep[0] is not None else x.reshape(-1, x.shape[-1])
            squares = rows.float().pow(2).sum(dim=0)
            sums[name] = sums[name] + squares if name in sums else squares

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def calibration_norms(
    model: torch.nn.Module, targets: dict[str, torch.nn.Module], items: list[Tokenized],
    pad_id: int, device: torch.device, autocast: Any,
) -> tuple[dict[str, torch.Tensor], int]:
    """(‖X_j‖₂ per target and input feature over every non-padding token of ``items``, the
    number of tokens), from no-grad forward passes of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    keep: list[torch.Tensor | None] = [None]
    tokens = 0
    try:
        with torch.no_grad(), input_sums(targets, keep) as sums:
            for start in range(0, len(items), CALIBRATION_BATCH):
                batch = collate(items[start:start + CALIBRATION_BATCH], pad_id).to(device)
                keep[0] = batch.attention_mask.bool()
                tokens += batch.n_tokens
                with autocast():
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False)
    finally:
        model.train(was_training)
    return {name: value.sqrt() for name, value in sums.items()}, tokens


@DEFENSES.register("antidote")
class Antidote(Defense):
    summary = "post-fine-tuning: prune the weights with the top Wanda scores on harmful data"
    paper = (
        "Huang et al. 2024, Antidote: Post-fine-tuning Safety Alignment for Large Language "
        "Models against Harmful Fine-tuning, arXiv 2408.09600"
    )
    reference = (
        "git-disl/Antidote utils.py (prune_wanda_outlier, prepare_calibration_input, "
        "WrappedGPT, find_layers), trainer.py (AntidoteTrainer.save_mask), train.py, "
        "script/finetune/antidote_poison_ratio.sh"
    )
    stages = (POST_FINETUNE,)
    multi_process = True
    needs_provider_harmful = True

    @dataclass
    class Options:
        dense_ratio: float = 0.1  # fraction of each output row zeroed (reference: 0.1)
        calibration_rows: int | None = 2000  # first N provider rows (reference: 2000); None: all
        # layer names to prune (e.g. [v_proj]); None: every LoRA factor, or q/k/v under full FT
        modules: list[str] | None = None
        # LORA_PRESETS name of the adapter fine-tuning trains (and Antidote prunes); None: the
        # run's finetune.train.lora (reference: r 256, α 4 on q, k, v = preset "antidote")
        finetune_lora: str | None = "antidote"

    reference_settings = (
        ReferenceSetting("defense_args.dense_ratio", 0.1, SCRIPT, "dense_ratio=0.1"),
        ReferenceSetting("defense_args.calibration_rows", 2000, SCRIPT,
                         "bad_sample_num=2000; utils.py's strict bounds 5000 < i < 7000 keep "
                         "1,999 unsafe BeaverTails rows"),
        ReferenceSetting("defense_args.modules", None, "git-disl/Antidote utils.py find_layers",
                         "every lora_A / lora_B in the decoder blocks (q/k/v under full FT)"),
        ReferenceSetting("defense_args.finetune_lora", "antidote", TRAIN_PY,
                         "the second LoraConfig: the fine-tuning adapter that is pruned"),
        ReferenceSetting("finetune.train.lora.r", 256, TRAIN_PY),
        ReferenceSetting("finetune.train.lora.alpha", 4, TRAIN_PY),
        ReferenceSetting("finetune.train.lora.dropout", 0.0, TRAIN_PY),
        ReferenceSetting("finetune.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         TRAIN_PY),
        ReferenceSetting("finetune.train.lr", 1e-4, SCRIPT),
        ReferenceSetting("finetune.train.epochs", 20, SCRIPT),
        ReferenceSetting("finetune.train.batch_size", 5, SCRIPT),
        ReferenceSetting("finetune.train.weight_decay", 0.1, SCRIPT),
        ReferenceSetting("finetune.train.warmup_ratio", 0.1, SCRIPT),
        ReferenceSetting("finetune.train.schedule", "constant", SCRIPT),
        ReferenceSetting("finetune.train.max_length", 2048, TRAIN_PY,
                         "model_max_length default; hftlab truncates to its own max_length"),
        ReferenceSetting("finetune.n", 5000, SCRIPT, "sample_num=5000"),
        ReferenceSetting("finetune.poison_ratio", 0.1, "git-disl/Antidote README.md",
                         "README runs antidote_poison_ratio.sh 0.1 (the script's default is 0.2)"),
        ReferenceSetting("alignment.train.lora.r", 256, TRAIN_PY,
                         "the first LoraConfig (r 256, α 4, q/k/v); hftlab's 'reference' preset "
                         "is Booster's r 32: the aligned adapter is merged before fine-tuning"),
        ReferenceSetting("alignment.train.lora.alpha", 4, TRAIN_PY),
        ReferenceSetting("alignment.train.lora.target_modules", ["q_proj", "k_proj", "v_proj"],
                         TRAIN_PY),
        ReferenceSetting("alignment.train.lr", 1e-3, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.epochs", 20, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.batch_size", 5, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.weight_decay", 0.1, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.warmup_ratio", 0.1, ALIGN_SCRIPT),
        ReferenceSetting("alignment.train.schedule", "cosine", ALIGN_SCRIPT),
        ReferenceSetting("alignment.data", "BeaverTails 30k_train, first 5000 is_safe pairs",
                         ALIGN_SCRIPT, "data_path BeaverTails_safe, sample_num 5000"),
    )

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        opts = self.options
        if not 0.0 < opts.dense_ratio < 1.0:
            raise ConfigError("defense_args.dense_ratio of 'antidote' must be in (0, 1)")
        if opts.calibration_rows is not None and opts.calibration_rows < 1:
            raise ConfigError("defense_args.calibration_rows of 'antidote' must be >= 1 or null")
        if opts.modules is not None and not opts.modules:
            raise ConfigError("defense_args.modules of 'antidote' must name a module, or be null")
        self._finetune_lora = None if opts.finetune_lora is None else lora_preset(
            opts.finetune_lora, "defense 'antidote'", "defense_args.finetune_lora")
        self._report: dict[str, Any] = {}

    def finetune_train(self, train: TrainConfig) -> TrainConfig:
        """The run's fine-tuning settings with the ``finetune_lora`` adapter (under LoRA)."""
        if self._finetune_lora is None or train.method != "lora":
            return train
        lora = dataclasses.replace(train.lora, **self._finetune_lora)
        return dataclasses.replace(train, lora=lora)

    def post_finetune(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        rows = ctx.data.provider_harmful
        if self.options.calibration_rows is not None:
            rows = rows[: self.options.calibration_rows]
        items = ctx.tokenize(rows, ctx.config.finetune.train.max_length) if rows else []
        if not items:
            raise ConfigError("defense 'antidote' needs the provider's harmful QA: set "
                              "provider_harmful (e.g. {kind: demo_harmful_qa, n: 90})")
        kind, targets = pruning_targets(model, self.options.modules)
        if not targets:
            raise ConfigError(f"defense 'antidote': no layer to prune matches modules="
                              f"{self.options.modules} in the decoder blocks")
        norms, tokens = calibration_norms(model, targets, items, ctx.tokenizer.pad_token_id,
                                          ctx.device, ctx.autocast)
        pruned = scored = 0
        by_part: dict[str, int] = {}
        with torch.no_grad():
            for name, module in targets.items():
                mask = wanda_mask(module.weight, norms[name], self.options.dense_ratio)
                module.weight.masked_fill_(mask.to(module.weight.device), 0)
                part = name.rsplit(".", 1)[-1]
                by_part[part] = by_part.get(part, 0) + int(mask.sum())
                pruned += int(mask.sum())
                scored += mask.numel()
        self._report = {
            "pruned": "lora_factors" if kind == "lora" else "full_weights",
            "dense_ratio": self.options.dense_ratio,
            "weights_zeroed": pruned,
            "weights_scored": scored,
            "fraction_zeroed": round(pruned / scored, 6),
            "zeroed_by_part": by_part,
            "layers_pruned": len(targets),
            "calibration_rows": len(items),
            "calibration_tokens": tokens,
        }
        return model

    def report(self, stage: str) -> dict[str, Any]:
        return dict(self._report) if stage == POST_FINETUNE else {}
