"""The run folder of `rlhf-bilevel train`: its layout, and the one place each of its files is written and read.

    recipe.yaml          the resolved recipe (after --set), what --resume reads back
    run.json             where relative paths of the recipe were read from, and the number of
                         processes (`world_size`) it was last started with and each one's share
                         of the (global) batch sizes (assembled by `run_record`)
    metrics.jsonl        one record per inner step ("inner") and per outer step ("outer")
    tensorboard/         the same numbers for TensorBoard
    preferences.jsonl    every pair the oracle labelled, as it arrived (TRL preference format)
    checkpoint-NNNNNN/   every `save_every` outer steps and at the end: adapters/lambda and
                         adapters/lambda_prime (plain peft), and state.safetensors with the
                         reward head, critics, optimisers, RNG and counters (checkpoint.py)
    summary.json         what the run learned: gold score of the reference and of π_λ

recipe.yaml, run.json and summary.json are written whole or not at all: into a temporary file
in the same folder, then renamed over the old one, so a kill never leaves half a file. The two
logs (metrics.jsonl, preferences.jsonl) are appended to as the run goes; a checkpoint is a
folder renamed into place once complete (checkpoint.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from rlhf_bilevel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_bilevel.config import ConfigError, read_text
from rlhf_bilevel.recipe import Recipe, parse_recipe, read_yaml, recipe_dict

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
ADAPTERS = "adapters"
"""The checkpoint's subfolder of peft adapters, one subfolder each: the only copy of the adapters' weights."""


def write_atomic(path: Path, text: str) -> None:
    """`text` as the whole content of `path`: a reader sees the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run_record(recipe: Recipe, base_dir: Path, world_size: int) -> dict:
    """The content of run.json: what a resume needs besides the recipe, and how the run is split."""
    cfg = recipe.bilevel
    # the recipe's batch sizes are global; each process draws this share of them
    shard = {
        "trajectories_per_step": cfg.trajectories_per_step // world_size,
        "pairs_per_step": cfg.pairs_per_step // world_size,
        "eval_pairs": recipe.train.eval_pairs // world_size,
    }
    return {"base_dir": str(base_dir.resolve()), "world_size": world_size, "per_process": shard}


class RunFolder:
    def __init__(self, path: Path):
        self.path = path

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def preferences(self) -> Path:
        return self.path / PREFERENCES_FILE

    def holds_run(self) -> bool:
        return (self.path / RECIPE_FILE).is_file()

    def check_new(self) -> None:
        if (self.path / RECIPE_FILE).exists():
            raise ConfigError(f"--output-dir: {self.path} already holds a run; continue it with --resume {self.path}, or pick another folder")

    def read_recipe(self, where: str, overrides: Sequence[str] = ()) -> Recipe:
        """The run's recipe, with `overrides` for this start only; `where` names the option that pointed here."""
        if not self.holds_run():
            raise ConfigError(f"{where}: {self.path} holds no run ({RECIPE_FILE} missing)")
        return parse_recipe(read_yaml(self.path / RECIPE_FILE), list(overrides))

    def base_dir(self, where: str) -> Path:
        """The folder the recipe's relative paths were read from when the run began."""
        text = read_text(self.path / RUN_FILE, where)
        try:
            return Path(json.loads(text)["base_dir"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{where}: {self.path / RUN_FILE} is damaged; it should read {{\"base_dir\": \"<the recipe's folder>\"}}") from None

    def write_start(self, recipe: Recipe, record: dict) -> None:
        """recipe.yaml and run.json, at every start of the run (a resume may change both)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / RECIPE_FILE, yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
        write_atomic(self.path / RUN_FILE, json.dumps(record))

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False))

    # -- checkpoints ---------------------------------------------------------------------------------
    def latest_checkpoint(self, on_skip: Callable[[str], None] | None = None) -> Path | None:
        return latest_checkpoint(self.path, on_skip=on_skip)

    def save(self, step: int, state: dict, model: PeftModel, keep: int | None) -> Path:
        """`state` (no adapter weights in it) and every adapter of `model` in peft's own format."""
        return save_checkpoint(self.path, step, state, write_extra=lambda folder: model.save_pretrained(folder / ADAPTERS), keep=keep)

    def load(self, checkpoint: Path, model: PeftModel, adapters: Sequence[str]) -> dict:
        """The state saved in `checkpoint`, after copying its `adapters` into `model`."""
        state = load_checkpoint(checkpoint)
        for name in adapters:
            file = adapter_folder(checkpoint, name) / "adapter_model.safetensors"
            try:
                tensors = load_file(file, device="cpu")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: missing (written by another version of rlhf-bilevel?)") from None
            result = set_peft_model_state_dict(model, tensors, adapter_name=name)
            if result.unexpected_keys:
                raise CheckpointError(f"{file}: holds weights the model has no place for ({result.unexpected_keys[0]}, …)")
        return state


def adapter_folder(checkpoint: Path, name: str) -> Path:
    """Where a checkpoint keeps adapter `name`: a plain peft adapter folder, loadable by any peft tool."""
    return checkpoint / ADAPTERS / name
