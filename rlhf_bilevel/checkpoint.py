"""Atomic save, verified load, resume: `run_dir/checkpoint-{step:06d}/`.

A checkpoint is written into `checkpoint-N.tmp/` and renamed into place only once every
file is on disk and listed, with its size and sha256, in `manifest.json`: a run killed
mid-save leaves a `.tmp` folder that is never loaded, and a file damaged later is caught
before it is used. Only safetensors and JSON are written, never pickle: loading a
checkpoint cannot run code.

The state is a tree of dicts, lists and tuples whose leaves are tensors or JSON scalars
(optimizer state_dicts, generator states, counters, the resolved config). Its tensors go
to `state.safetensors` under their path in the tree; the tree itself goes to
`state.json`, where a node JSON cannot say exactly is tagged by a single `$` key:

    {"$tensor": "optimizer/state/0/exp_avg"}   a tensor of state.safetensors
    {"$tuple": [...]}                          a tuple (a plain JSON array is a list)
    {"$dict": [[0, ...], [1, ...]]}            a dict with int keys (torch optimizer state)
    {"$float": "nan"}                          NaN and ±inf

Dicts with plain string keys stay plain JSON objects, so the config reads as written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_TENSORS = "state.safetensors"
STATE_TREE = "state.json"
MANIFEST = "manifest.json"
NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: one line naming the file at fault."""


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: dict,
    write_extra: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Writes `state` (and whatever `write_extra(folder)` adds) as `run_dir/checkpoint-{step:06d}`.

    `keep` deletes all but the newest `keep` checkpoints up to this step. Checkpoints of
    later steps (left by a run that was resumed from an earlier one) are not touched:
    which of two histories to keep is the caller's decision.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep: must be ≥ 1, got {keep}")
    tensors: dict[str, Tensor] = {}
    tree = encode(state, "", tensors)  # first, so that a state that cannot be saved leaves no folder
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # a save of this step that was killed before its rename
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / STATE_TENSORS)
    (tmp / STATE_TREE).write_text(json.dumps(tree, indent=1, allow_nan=False), encoding="utf-8")
    if write_extra is not None:
        write_extra(tmp)
    write_manifest(tmp, step)
    if final.exists():
        # a folder cannot be renamed onto a non-empty one: move the old copy aside first;
        # a kill between the two renames leaves it in `.old`, which is never loaded
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(run_dir)
    if keep is not None:
        older = [path for s, path in checkpoints(run_dir) if s < step]
        for path in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(path)
    return final


def load_checkpoint(path: Path) -> dict:
    """The state saved in `path`, after checking every file against the manifest. Tensors come back on the CPU.

    A checkpoint may come from elsewhere, its manifest rewritten to match: whatever does not
    decode is a CheckpointError, and nothing in it is ever executed (safetensors and JSON only).
    """
    verify_checkpoint(path)
    try:
        tensors = load_file(path / STATE_TENSORS, device="cpu")
        return decode(json.loads((path / STATE_TREE).read_text(encoding="utf-8")), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: its state does not decode ({type(error).__name__}: {error})") from None


def latest_checkpoint(run_dir: Path, on_skip: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies. Each one skipped is described to `on_skip`
    (by default in a RuntimeWarning): a user must learn that a run went back further than its newest folder.

    Unfinished saves (`.tmp`) are not candidates at all; they are what a kill leaves behind.
    """
    for _, path in reversed(checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            message = f"skipping a checkpoint that does not verify: {error}"
            if on_skip is None:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            else:
                on_skip(message)
            continue
        return path
    return None


def verify_checkpoint(path: Path) -> None:
    """Raises CheckpointError unless every file in the manifest is present with its size and sha256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path / MANIFEST}: missing (the save did not finish)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path / MANIFEST}: not valid JSON ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entry = {"size": int, "sha256": str}
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and all(type(e.get(k)) is t for k, t in entry.items()) for e in files.values()
    ):
        raise CheckpointError(f"{path / MANIFEST}: not a manifest (expected files: {{name: {{size, sha256}}}})")
    for name in (STATE_TENSORS, STATE_TREE):
        if name not in files:
            raise CheckpointError(f"{path / name}: not listed in {MANIFEST}")
    for name, expected in files.items():
        file = path / name
        if not file.resolve().is_relative_to(path.resolve()):
            raise CheckpointError(f"{path / MANIFEST}: lists {name!r}, outside the checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected['size']}")
        if sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the manifest (the file is corrupt)")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint folder, oldest first; `.tmp` and `.old` are not."""
    if not run_dir.is_dir():
        return []
    found = [(int(match[1]), path) for path in run_dir.iterdir() if (match := NAME.fullmatch(path.name)) and path.is_dir()]
    return sorted(found)


# -- the manifest -------------------------------------------------------------------------------


def write_manifest(folder: Path, step: int) -> None:
    """Lists every file with its size and sha256, after forcing each to disk, then writes itself and syncs."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": sha256(file)}
    with (folder / MANIFEST).open("w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Makes the entries of a folder (new files, renames) durable, not only the files' contents."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the state tree -----------------------------------------------------------------------------


def encode(node: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """The JSON form of `node`; its tensors are moved to `tensors` under their path in the tree."""
    if isinstance(node, Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint state: two tensors at the path '{path}' (a key contains '/')")
        # a private contiguous CPU copy: safetensors refuses views and tensors that share storage
        tensors[path] = node.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return {"$tensor": path}
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if isinstance(node, float):
        return node if math.isfinite(node) else {"$float": repr(node)}
    if isinstance(node, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return {"$tuple": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]}
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"checkpoint state: {path or '/'}: dict key {key!r} is not a str or an int")
        if all(isinstance(key, str) and not key.startswith("$") for key in node):
            return {key: encode(v, f"{path}/{key}", tensors) for key, v in node.items()}
        return {"$dict": [[key, encode(v, f"{path}/{key}", tensors)] for key, v in node.items()]}
    kinds = "tensors, None, bool, int, float, str, dicts, lists and tuples"
    raise TypeError(f"checkpoint state: {path or '/'}: cannot save a {type(node).__name__} (only {kinds})")


def decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and (tag := next(iter(node))).startswith("$"):
        value = node[tag]
        match tag:
            case "$tensor":
                return tensors[value]
            case "$tuple":
                return tuple(decode(v, tensors) for v in value)
            case "$dict":
                return {key: decode(v, tensors) for key, v in value}
            case "$float":
                return float(value)
        raise CheckpointError(f"{STATE_TREE}: unknown node {tag!r}")
    return {key: decode(v, tensors) for key, v in node.items()}
