"""The survey's mechanism measurements (§3): forgetting and revitalisation curves during
fine-tuning, and the drift of hidden states away from the aligned model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hftlab.formatting import Tokenized
from hftlab.model import causal_lm_parts
from hftlab.train import SFTTrainer, collate, mean_loss


class MechanismTracker:
    """``on_step`` callback: every ``every`` optimizer steps (and at step 0) record the task
    loss (on a fixed slice of the user's benign rows), the *alignment loss* (held-out refusal
    pairs; rising = forgetting) and the *harmful loss* (held-out harmful QA; falling =
    revitalisation), plus the mean training loss since the last point."""

    def __init__(
        self,
        every: int,
        task: list[Tokenized],
        alignment: list[Tokenized],
        harmful: list[Tokenized],
        batch_size: int,
    ) -> None:
        self.every = every
        self.sets = {"task_loss": task, "alignment_loss": alignment, "harmful_loss": harmful}
        self.batch_size = batch_size
        self.curves: list[dict[str, float | int | None]] = []
        self._recent: list[float] = []

    def record(self, trainer: SFTTrainer, train_loss: float | None) -> None:
        point: dict[str, float | int | None] = {"step": trainer.step, "train_loss": train_loss}
        for name, items in self.sets.items():
            point[name] = (
                mean_loss(
                    trainer.model, items, trainer.pad_id, self.batch_size, trainer.device,
                    trainer.autocast,
                )
                if items
                else None
            )
        self.curves.append(point)

    def __call__(self, trainer: SFTTrainer, loss: float) -> None:
        self._recent.append(loss)
        if trainer.step % self.every == 0:
            self.record(trainer, sum(self._recent) / len(self._recent))
            self._recent = []

    def state_dict(self) -> dict[str, Any]:
        """The points so far, for a trainer checkpoint (a resumed stage keeps its curves)."""
        return {"curves": [dict(p) for p in self.curves], "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curves = [dict(p) for p in state["curves"]]
        self._recent = list(state["recent"])

    def finish(self, trainer: SFTTrainer) -> None:
        if not self.curves or self.curves[-1]["step"] != trainer.step:
            recent = sum(self._recent) / len(self._recent) if self._recent else None
            self.record(trainer, recent)


@torch.no_grad()
def hidden_states(
    model: torch.nn.Module,
    items: list[Tokenized],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> list[list[torch.Tensor]]:
    """Per example, per decoder layer: the hidden states of the real (unpadded) tokens, in
    fp32 on the CPU. Index 0 is the embedding output; index ``l`` the output of block ``l``."""
    was_training = model.training
    model.eval()
    body, _ = causal_lm_parts(model)
    states: list[list[torch.Tensor]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate(chunk, pad_id).to(device)
        with autocast():
            out = body(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            )
        for row, item in enumerate(chunk):
            length = len(item.input_ids)
            states.append([h[row, :length].float().cpu() for h in out.hidden_states])
    model.train(was_training)
    return states


def embedding_drift(
    before: list[list[torch.Tensor]], after: list[list[torch.Tensor]]
) -> dict[str, Any]:
    """Per layer, the mean over tokens of ‖h_after − h_before‖₂ (the survey's drift); and the
    mean over layers. Layer 0 (embeddings) is included so a frozen embedding shows 0."""
    n_layers = len(before[0])
    per_layer = []
    for layer in range(n_layers):
        distances = torch.cat(
            [(a[layer] - b[layer]).norm(dim=-1) for a, b in zip(after, before)]
        )
        per_layer.append(float(distances.mean()))
    return {"per_layer": per_layer, "mean": sum(per_layer) / n_layers}
