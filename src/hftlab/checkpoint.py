"""A training stage's checkpoints on disk: committed as one unit, stored without pickle.

A stage's checkpoint folder::

    checkpoint/
      latest.json              the pointer: {"format": 2, "step": 4, "folder": "step-000004"}
      step-000004/
        trainer.json           the main process's state: step, the stage's size, schedule,
        trainer.safetensors      optimizer groups, defense and callback state (JSON), and its
                                 tensors (trainable weights, optimizer moments, ...)
        rng-0.json             each process's random generators (python, numpy, torch, cuda)
        rng-0.safetensors
        rng-1.json ...

A save writes a new step folder (each file fsynced, then the folder), then switches the pointer
(a temporary file, fsync, ``os.replace``, fsync of the checkpoint folder) and only then deletes
older step folders. Whatever moment a kill strikes, the pointer names a complete step folder or
there is none; step folders it does not name are leftovers of an interrupted save, removed when
the stage starts again (:func:`remove_uncommitted`).

Nothing read from a run folder is unpickled (a crafted file must not run code): tensors live in
safetensors files, everything else in JSON. :func:`encode` turns nested dicts, lists and tuples
into JSON, with each tensor or numpy array stored under a generated key and replaced by a
reference; tuples, dicts with non-string keys, numpy scalars and non-finite floats are tagged,
so that :func:`decode` gives back equal values of the same types (``random.setstate`` needs its
tuples back).

Every file goes through :func:`_write_file` and every rename or deletion announces itself first
(:func:`hftlab.faults.announce_change`), so tests can stop a save at any of them, as a
``kill -9`` would.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from hftlab.config import ConfigError
from hftlab.faults import announce_change

FORMAT = 2  # 1: trainer.pt and rng-<rank>.pt (pickled, replaced file by file)
POINTER = "latest.json"
MAIN_STATE = "trainer"  # trainer.json + trainer.safetensors
STEP_FOLDER = re.compile(r"step-\d{6,}")

# the tags of encoded values (a plain dict never has one of these keys: see _encode)
TENSOR, NDARRAY, TUPLE, ITEMS, FLOAT, NUMPY = (
    "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__", "__numpy__")
TAGS = frozenset({TENSOR, NDARRAY, TUPLE, ITEMS, FLOAT, NUMPY})



def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def rng_name(rank: int) -> str:
    return f"rng-{rank}"


def rng_state() -> dict[str, Any]:
    """This process's global random generators (python, numpy, torch, cuda)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- the codec


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A JSON-serialisable form of ``value`` and the tensors it refers to by key."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(value, "", tensors, set()), tensors


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`encode` was given, its tensors taken from ``tensors`` (on the CPU)."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if not TAGS.intersection(value):
        return {k: decode(v, tensors) for k, v in value.items()}
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if NDARRAY in value:
        raw = tensors[value[NDARRAY]].numpy()
        return raw.view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if TUPLE in value:
        return tuple(decode(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {decode(k, tensors): decode(v, tensors) for k, v in value[ITEMS]}
    if FLOAT in value:
        return float(value[FLOAT])
    return np.dtype(value[NUMPY]).type(decode(value["value"], tensors))


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):  # before float: np.float64 is a float
        return {NUMPY: value.dtype.str, "value": _encode(value.item(), path, tensors, storages)}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {FLOAT: repr(float(value))}
    if isinstance(value, torch.Tensor):
        return {TENSOR: _store(_detached(value, storages), path, tensors)}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"checkpoint state {path or '<root>'}: an object array")
        raw = torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())
        return {NDARRAY: _store(raw, path, tensors), "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{path}/{i}", tensors, storages)
                        for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, storages) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not TAGS.intersection(value):
            return {k: _encode(v, f"{path}/{k}", tensors, storages) for k, v in value.items()}
        return {ITEMS: [[_encode(k, f"{path}/{k}#key", tensors, storages),
                         _encode(v, f"{path}/{k}", tensors, storages)]
                        for k, v in value.items()]}
    raise TypeError(f"checkpoint state {path or '<root>'}: cannot store a "
                    f"{type(value).__name__} (only tensors, arrays, numbers, strings, None, "
                    "and lists, tuples and dicts of them)")


def _detached(tensor: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor safetensors accepts: a copy only when it is not one already or
    shares its storage with a tensor stored before (safetensors refuses shared memory)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.numel():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            return tensor.clone()
        storages.add(pointer)
    return tensor


def _store(tensor: torch.Tensor, path: str, tensors: dict[str, torch.Tensor]) -> str:
    key = path.lstrip("/") or "root"
    unique, n = key, 1
    while unique in tensors:
        unique, n = f"{key}#{n}", n + 1
    tensors[unique] = tensor
    return unique


# ------------------------------------------------------------------------- files and folders


def write_state(folder: Path, name: str, state: Any) -> int:
    """Write ``state`` as ``name.safetensors`` (its tensors) and then ``name.json`` (the rest,
    with the tensor file's size); returns the bytes written."""
    tree, tensors = encode(state)
    tensor_path = folder / f"{name}.safetensors"
    _write_file(tensor_path, lambda p: safetensors.torch.save_file(tensors, p))
    size = tensor_path.stat().st_size
    text = json.dumps({"format": FORMAT, "tensors": tensor_path.name, "bytes": size,
                       "state": tree}, allow_nan=False, separators=(",", ":"))
    _write_file(folder / f"{name}.json", lambda p: p.write_text(text, encoding="utf-8"))
    return size + len(text)


def read_state(folder: Path, name: str, fix: str) -> dict[str, Any]:
    """What :func:`write_state` wrote, or one ConfigError naming the damaged file and ``fix``."""
    path = folder / f"{name}.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        tensor_path = folder / saved["tensors"]
        if tensor_path.parent != folder:
            raise ValueError(f"tensor file {saved['tensors']!r} outside the step folder")
        path = tensor_path
        if tensor_path.stat().st_size != saved["bytes"]:
            raise ValueError(f"{tensor_path.stat().st_size} bytes, {saved['bytes']} written")
        tensors = safetensors.torch.load_file(tensor_path)
        path = folder / f"{name}.json"
        state = decode(saved["state"], tensors)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__} where the state should be")
        return state
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ConfigError(f"{path}: a damaged training checkpoint ({reason}); {fix}") from exc


def commit(root: Path, folder: Path, step: int) -> None:
    """Make the complete step ``folder`` the checkpoint: fsync it, switch the pointer, then
    delete every other step folder (older ones, or leftovers of an interrupted save)."""
    _fsync_dir(folder)
    _fsync_dir(root)  # the step folder's own entry, before a pointer names it
    pointer = {"format": FORMAT, "step": step, "folder": folder.name}
    tmp = root / f"{POINTER}.tmp"
    _write_file(tmp, lambda p: p.write_text(json.dumps(pointer, indent=2) + "\n"))
    announce_change(root / POINTER)
    os.replace(tmp, root / POINTER)
    _fsync_dir(root)
    for stale in _step_folders(root):
        if stale != folder:
            announce_change(stale)
            shutil.rmtree(stale)


def committed_folder(root: Path, fix: str) -> Path | None:
    """The step folder the pointer names; None when there is no checkpoint. A checkpoint of
    the pickled format 1 (``trainer.pt``) is refused unread, as is a damaged pointer."""
    old = sorted(p.name for p in root.glob("*.pt")) if root.is_dir() else []
    if old:
        raise ConfigError(f"{root}: a training checkpoint of an older hftlab version "
                          f"({', '.join(old)}), which is never loaded (pickle can run code); "
                          f"{fix}")
    if not (root / POINTER).is_file():
        return None
    pointer = read_pointer(root)
    if pointer is None:
        raise ConfigError(f"{root / POINTER}: not a checkpoint pointer of this hftlab version "
                          f"(format {FORMAT}); {fix}")
    folder = root / pointer["folder"]
    if not folder.is_dir():
        raise ConfigError(f"{root / POINTER}: names {folder.name}, which is missing; {fix}")
    return folder


def read_pointer(root: Path) -> dict[str, Any] | None:
    """The pointer's content when it is one of this format (None if missing or not)."""
    try:
        pointer = json.loads((root / POINTER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (isinstance(pointer, dict) and pointer.get("format") == FORMAT
             and isinstance(pointer.get("step"), int) and isinstance(pointer.get("folder"), str)
             and STEP_FOLDER.fullmatch(pointer["folder"]) is not None)
    return pointer if valid else None


def checkpoint_step(root: Path) -> int | None:
    """The step the checkpoint in ``root`` holds, from its small pointer file alone (nothing
    else is read); None when there is none of this format (a run reports why)."""
    pointer = read_pointer(root)
    return None if pointer is None else pointer["step"]


def remove_uncommitted(root: Path, keep: Path | None) -> None:
    """Delete step folders other than ``keep`` and a pointer never switched: what a save that
    was interrupted before (or while) committing left behind."""
    if not root.is_dir():
        return
    for stale in _step_folders(root):
        if stale != keep:
            shutil.rmtree(stale)
    (root / f"{POINTER}.tmp").unlink(missing_ok=True)


def _step_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name))


def _write_file(path: Path, fill: Callable[[Path], Any]) -> None:
    """The one way a checkpoint file is written: announced, filled, fsynced."""
    announce_change(path)
    fill(path)
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, a rename) durable; a no-op where folders cannot
    be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
