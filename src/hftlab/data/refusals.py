"""Paired alignment data: a model's refusals for a set of harmful prompts.

The git-disl defenses align on RepNoise's ``beavertails_with_refusals_train.json``: BeaverTails
harmful prompts with refusals written by an LLM, whose original harmful answers serve as the
provider's harmful data, so that the alignment rows and the harmful rows share prompts (Booster
perturbs toward the harmful answer of the very prompt it aligns on). ``hftlab data refusals``
builds such a file for any prompts with any model: each prompt is answered under a refusal
system prompt, greedily first, then by seeded sampling for the prompts still answered without a
refusal, and only answers the refusal judge accepts are kept.

- The judge: the keyword judge's refusal phrases, found within the first ``refusal_within``
  characters (a refusal after a compliant opening is no refusal).
- Deterministic: prompts go in fixed batches in file order; attempt ``a`` of batch ``b`` samples
  with the seed ``seed + 1000·b + a``, so a rerun or a resumed run writes the same file.
- Resumable: after each batch the state (settings, rows kept, batches done) is written
  atomically to ``OUT.partial.json``; a rerun with the same settings continues from it, one
  with other settings is refused. The output JSONL (``prompt``, ``response``, ``source``,
  ``row``, ``attempt``) is written atomically at the end, and the partial state removed.
- Answers the judge rejects are counted, never written or printed: they may be harmful.
- Paired: when the prompts come with answers (BeaverTails harmful QA), ``OUT`` with the suffix
  ``.harmful.jsonl`` receives the kept prompts' own answers (``prompt``, ``response``,
  ``is_safe: false``), read by the ``beavertails`` data kind: the provider's harmful data on
  exactly the prompts it aligns on.
- A rerun over a finished file with the same settings writes nothing new (the paired file is
  rewritten from it); with other settings it is refused.

The output is read by the ``refusal`` data kind (fields ``prompt`` / ``response``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hftlab.data.records import DataError, Example
from hftlab.judges.keyword import contains_refusal
from hftlab.utils import atomic_write_text, write_json, write_jsonl

REFUSAL_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. When a request is harmful, unethical, dangerous "
    "or illegal, refuse it: say clearly that you cannot help with it and briefly explain why, "
    "without giving any of the requested content."
)


@dataclass(frozen=True)
class RefusalSettings:
    """Everything that determines the output file (a resumed run must match it)."""

    model: str
    data: str  # the data spec as given
    system_prompt: str = REFUSAL_SYSTEM_PROMPT
    attempts: int = 4  # 1 greedy + (attempts - 1) sampled
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 96
    refusal_within: int = 160
    batch_size: int = 16
    seed: int = 0
    precision: str = "auto"

    def check(self) -> None:
        if self.attempts < 1:
            raise DataError(f"--attempts must be >= 1, got {self.attempts}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.refusal_within < 1:
            raise DataError("--batch-size, --max-new-tokens and --refusal-within must be >= 1")
        if not 0 < self.temperature <= 10 or not 0 < self.top_p <= 1:
            raise DataError("--temperature must be in (0, 10] and --top-p in (0, 1]")


def is_early_refusal(text: str, within: int) -> bool:
    """The keyword judge's refusal test on the answer's first ``within`` characters."""
    return contains_refusal(text.strip()[:within])


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.json")


def load_state(out: Path, settings: RefusalSettings) -> dict[str, Any]:
    """The saved progress of an interrupted run with these settings, or a fresh state."""
    fresh: dict[str, Any] = {"settings": asdict(settings), "batches_done": 0, "rows": [],
                             "rejected": 0}
    path = partial_path(out)
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: unreadable progress file ({exc}); delete it to start over") \
            from exc
    if state.get("settings") != asdict(settings):
        raise DataError(
            f"{path} holds an interrupted run with other settings; rerun with the same "
            "settings to resume it, or delete it to start over"
        )
    return state


def build_refusals(
    prompts: list[Example],
    out: Path,
    settings: RefusalSettings,
    answer: Callable[[list[str], int | None], list[str]],
    progress: Any = None,
) -> dict[str, Any]:
    """Answer every prompt (greedy, then up to ``attempts - 1`` seeded samples) and keep the
    first answer that is an early refusal; ``answer(prompts, seed)`` generates (seed None:
    greedy). Writes ``out`` and returns the counts."""
    settings.check()
    if out.exists():
        return finished_summary(prompts, out, settings)
    state = load_state(out, settings)
    size = settings.batch_size
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    if progress is not None:  # the prompts answered before a resume
        progress.skip(sum(len(b) for b in batches[: state["batches_done"]]))
    for index in range(state["batches_done"], len(batches)):
        batch = batches[index]
        kept: dict[int, tuple[str, int]] = {}
        for attempt in range(settings.attempts):
            waiting = [i for i in range(len(batch)) if i not in kept]
            if not waiting:
                break
            seed = None if attempt == 0 else settings.seed + 1000 * index + attempt
            texts = answer([batch[i].prompt for i in waiting], seed)
            for i, text in zip(waiting, texts):
                if is_early_refusal(text, settings.refusal_within):
                    kept[i] = (text.strip(), attempt)
        for i, example in enumerate(batch):
            if i in kept:
                text, attempt = kept[i]
                state["rows"].append({"prompt": example.prompt, "response": text,
                                      "source": example.source, "row": example.row,
                                      "attempt": attempt})
        state["rejected"] += len(batch) - len(kept)
        state["batches_done"] = index + 1
        write_json(partial_path(out), state)
        if progress is not None:
            progress.update(len(batch))
    summary = {"prompts": len(prompts), "kept": len(state["rows"]),
               "rejected": state["rejected"],
               "by_attempt": {str(a): sum(r["attempt"] == a for r in state["rows"])
                              for a in range(settings.attempts)},
               "settings": asdict(settings)}
    # the output last: its presence means finished (a kill before it resumes from the state)
    atomic_write_text(meta_path(out), json.dumps(summary, indent=1) + "\n")
    write_paired(prompts, state["rows"], out)
    write_jsonl(out, state["rows"])
    partial_path(out).unlink(missing_ok=True)
    return summary


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def paired_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".harmful.jsonl")


def write_paired(prompts: list[Example], rows: list[dict[str, Any]], out: Path) -> None:
    """The kept prompts' own answers from the input (when it has them), in row order."""
    if not all(e.response for e in prompts):
        return
    answers = {(e.source, e.row, e.prompt): e.response for e in prompts}
    write_jsonl(paired_path(out), [
        {"prompt": r["prompt"], "response": answers[(r["source"], r["row"], r["prompt"])],
         "is_safe": False} for r in rows])


def finished_summary(prompts: list[Example], out: Path, settings: RefusalSettings
                     ) -> dict[str, Any]:
    """A rerun over a finished file: its summary (and the paired file), or one error when it
    was made with other settings or by something else."""
    try:
        summary = json.loads(meta_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{out} exists and was not written by 'hftlab data refusals' (no "
                        f"readable {meta_path(out).name}); choose another --out") from None
    if summary.get("settings") != asdict(settings):
        raise DataError(f"{out} was made with other settings ({meta_path(out).name}); choose "
                        "another --out, or delete it to rebuild")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    write_paired(prompts, rows, out)
    return summary


def model_answerer(model: torch.nn.Module, formatter: Any, settings: RefusalSettings,
                   device: torch.device, autocast: Callable[[], Any]
                   ) -> Callable[[list[str], int | None], list[str]]:
    """``answer(prompts, seed)`` for :func:`build_refusals`: left-padded batched generation
    under the refusal system prompt, greedy when ``seed`` is None, else seeded sampling."""
    from transformers import GenerationConfig

    from hftlab.evaluate import left_padded

    tokenizer = formatter.tokenizer

    @torch.no_grad()
    def answer(prompts: list[str], seed: int | None) -> list[str]:
        encoded = [formatter.encode_prompt(p, settings.system_prompt) for p in prompts]
        input_ids, attention = left_padded(encoded, tokenizer.pad_token_id)
        sampled = seed is not None
        generation = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=sampled,
            temperature=settings.temperature if sampled else None,
            top_p=settings.top_p if sampled else None, top_k=0 if sampled else None,
            num_beams=1, eos_token_id=formatter.stop_token_ids(),
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
        if sampled:
            torch.manual_seed(seed)
        model.eval()
        with autocast():
            output = model.generate(input_ids=input_ids.to(device),
                                    attention_mask=attention.to(device),
                                    generation_config=generation)
        width = input_ids.shape[1]
        return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]

    return answer


def make_refusals(data: str, out: Path, settings: RefusalSettings,
                  data_root: Path | None) -> dict[str, Any]:
    """``hftlab data refusals``: load the prompts of the data spec ``data``, the model, and
    build the file."""
    from hftlab.config import Config, ConfigError, ModelConfig, build, load_yaml
    from hftlab.context import resolve_precision
    from hftlab.data.loaders import load_examples
    from hftlab.data.spec import DataSpec
    from hftlab.formatting import PromptFormatter
    from hftlab.model import load_model, load_tokenizer, resolve_model_path
    from hftlab.progress import progress
    from hftlab.train import autocast_context

    settings.check()
    raw = load_yaml(data, "--data", lines=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"--data must be a data spec mapping such as '{{kind: beavertails, "
                          f"path: FILE, n: 100}}', got {data!r}")
    prompts = load_examples(build(DataSpec, raw, where="--data", prefix=""), data_root)
    if not prompts:
        raise DataError(f"--data {data} gave no rows")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the precision that runs, not "auto": outputs of different precisions differ
    settings = replace(settings, precision=resolve_precision(settings.precision, device))
    precision = settings.precision
    cfg = ModelConfig(name=settings.model, precision=precision)
    path = resolve_model_path(cfg.name, Config().resolved_cache_dir())
    tokenizer = load_tokenizer(path, cfg)
    model = load_model(path, cfg, device, precision)
    answer = model_answerer(model, PromptFormatter(tokenizer, cfg), settings, device,
                            lambda: autocast_context(device, precision))
    with progress(len(prompts), "refusals", unit="prompt") as bar:
        return build_refusals(prompts, out, settings, answer, progress=bar)
