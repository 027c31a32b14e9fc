"""Where Virus keeps the rows its GCG search optimised, and which runs share them.

The search takes minutes on a CPU and its result depends on the problem alone, so the rows are
kept in the cache folder under a key of everything they depend on: a resumed run, a second
worker or another defense on the same upload reads them back. :func:`cache_file` is that key at
run time; :func:`search_problem` is the same problem read from a run's config alone, for
``hftlab plan``, which prices one search per problem before any data are built. A change to what
the one hashes belongs in the other too."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hftlab.attacks.virus_surrogate import aligned_adapter_folder
from hftlab.data.loaders.core import data_fingerprint
from hftlab.utils import stable_hash

if TYPE_CHECKING:
    from hftlab.config import Config
    from hftlab.context import RunContext
    from hftlab.data.records import Example
    from hftlab.judges import Judge

#: The model settings a surrogate is loaded with (``RunContext.model_key``), by config field.
MODEL_FIELDS = ("revision", "dtype", "attn_implementation", "prompt_format", "system_prompt")


def cache_file(run: RunContext, options: Any, judge: Judge, benign: list[Example],
               harmful: list[Example], seed: int) -> Path:
    """``<cache>/virus/<key>.json``: the options (but the sampling, which the rows show), the
    surrogate, the aligned adapter the gradient is matched on, the rows, the seed, the guard
    and torch's version."""
    from hftlab.model import resolve_model_path

    surrogate = (run.model_key() if options.model is None else
                 {**run.model_key(), "model": resolve_model_path(options.model, run.cache_dir),
                  "revision": None})
    # the run's alignment checkpoint is named by its key, so its path stands for its weights
    aligned = (str(aligned_adapter_folder(run, options.adapter)[0])
               if options.match_on == "aligned_lora" else None)
    key = stable_hash({
        "options": {k: v for k, v in asdict(options).items() if k != "sample"},
        "surrogate": surrogate,
        "aligned_adapter": aligned,
        "benign": data_fingerprint(benign),
        "harmful": data_fingerprint(harmful),
        "seed": seed,
        "judge": judge.describe(),
        "torch": torch.__version__,
    })[:16]
    return run.cache_dir / "virus" / f"{key}.json"


def search_problem(config: Config, options: Any, alignment: str) -> dict[str, Any]:
    """The problem a run's search solves, read from its config: the options, the surrogate, the
    aligned adapter (``alignment``: the signature of the run's alignment, when the gradient is
    matched on it and no adapter is named), the upload's settings (which, with the seed and the
    sampling, choose the rows) and the seed. The guard's files and torch's version, which the
    cache key also holds, are the same for the runs of one sweep."""
    model = asdict(config.model)
    surrogate = {"model": options.model or model["name"],
                 **{k: model[k] for k in MODEL_FIELDS},
                 **({"revision": None} if options.model else {})}
    aligned = (options.adapter or alignment) if options.match_on == "aligned_lora" else None
    upload = {k: v for k, v in asdict(config.finetune).items() if k not in ("train", "precision")}
    return {"options": asdict(options), "surrogate": surrogate, "aligned_adapter": aligned,
            "upload": upload, "seed": config.seed}
