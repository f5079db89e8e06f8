"""The prompts a run trains and evaluates on: a local .jsonl/.json/.parquet/.csv file, or a hub dataset.

A path is relative to the recipe's folder, so a recipe and its data move together. A value
that names no local file and does not look like a path (no file extension, not ./ or /)
is taken as a hub dataset id. Every problem with the data is a one-line ConfigError that
names the recipe field, since it is the user's file, not our code, that needs fixing.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
from datasets.exceptions import DatasetsError

from rlhf_bilevel.config import ConfigError, positive, read_text

SECTION = "prompts"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension → the `datasets` builder that reads it."""


@dataclass(frozen=True)
class PromptConfig:
    train: str = dataclasses.field(
        metadata={"help": "a .jsonl/.json/.parquet/.csv file (relative to the recipe's folder) or a hub dataset id (required)", "path": True}
    )
    eval: str | None = dataclasses.field(default=None, metadata={"help": "held-out prompts, same forms as train; null: no evaluation prompts", "path": True})
    field: str = dataclasses.field(default="prompt", metadata={"help": "the column that holds the prompt text"})
    train_split: str = dataclasses.field(default="train", metadata={"help": "split of a hub dataset named by train"})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "split of a hub dataset named by eval"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "keep only the first `limit` prompts of each set (> 0), for a quick run"})

    def __post_init__(self) -> None:
        if self.limit is not None:
            positive(self, "limit")


def load_prompts(cfg: PromptConfig, base_dir: Path) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts); the eval list is empty when `cfg.eval` is None."""
    train = load_set(cfg, cfg.train, cfg.train_split, base_dir, f"{SECTION}.train")
    held_out = [] if cfg.eval is None else load_set(cfg, cfg.eval, cfg.eval_split, base_dir, f"{SECTION}.eval")
    return train, held_out


def load_set(cfg: PromptConfig, source: str, split: str, base_dir: Path, where: str) -> list[str]:
    """One prompt set, checked row by row: every prompt a non-blank string."""
    path = local_path(source, base_dir, where)
    dataset = read_file(path, where) if path else read_hub(source, split, where)
    name = path or f"{source} ({split})"
    if len(dataset) == 0:
        raise ConfigError(f"{where}: {name} has no prompts")
    if cfg.field not in dataset.column_names:
        raise ConfigError(f"{SECTION}.field: no column {cfg.field!r} in {name}; columns: {', '.join(dataset.column_names)}")
    if cfg.limit is not None:
        dataset = dataset.select(range(min(cfg.limit, len(dataset))))
    prompts = list(dataset[cfg.field])
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: row {row} of {name}: {cfg.field!r} must be a non-blank string, got {prompt!r}")
    return prompts


def local_path(source: str, base_dir: Path, where: str) -> Path | None:
    """The file `source` names, or None when it is a hub id; a path-like name for no file is an error, not a hub id."""
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    looks_like_path = source.startswith((".", "/", "~")) or Path(source).suffix[1:].isalpha()
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a directory; name a {'/'.join(BUILDERS)} file")
    if not path.is_file():
        if looks_like_path:
            raise ConfigError(f"{where}: no such file {path}")
        return None
    if path.suffix.lower() not in BUILDERS:
        raise ConfigError(f"{where}: {path}: unsupported extension {path.suffix!r}; use one of {', '.join(BUILDERS)}")
    return path


def read_file(path: Path, where: str) -> datasets.Dataset:
    """A local file through its `datasets` builder, prepared in a temporary cache that is deleted afterwards.

    The builder is run step by step rather than through `load_dataset` because an empty file
    then shows as a split of 0 examples instead of an opaque "corresponds to no data" error.
    """
    builder_name = BUILDERS[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise ConfigError(f"{where}: {path} has no prompts (the file is empty)")
    if builder_name == "parquet":
        # the parquet builder fails on a file of 0 rows with an internal "BatchSize must be greater than 0"
        if read_parquet_rows(path, where) == 0:
            raise ConfigError(f"{where}: {path} has no prompts")
    else:
        # Arrow stores undecodable bytes as strings and fails only when a row is read: check first.
        read_text(path, where)
    with tempfile.TemporaryDirectory(prefix="rlhf-bilevel-prompts-") as cache, quiet_datasets():
        builder = datasets.load_dataset_builder(builder_name, data_files=str(path), cache_dir=cache)
        try:
            builder.download_and_prepare()
        except (DatasetsError, pyarrow.ArrowException, ValueError, StopIteration, OSError) as error:
            raise ConfigError(f"{where}: cannot read {path}: {root_cause(error)}") from None
        if not builder.info.splits["train"].num_examples:
            raise ConfigError(f"{where}: {path} has no prompts")
        return builder.as_dataset(split="train", in_memory=True)


def read_parquet_rows(path: Path, where: str) -> int:
    """The number of rows a parquet file's footer declares."""
    try:
        return pyarrow.parquet.read_metadata(path).num_rows
    except (pyarrow.ArrowException, OSError) as error:
        raise ConfigError(f"{where}: cannot read {path}: {root_cause(error)}") from None


def read_hub(dataset_id: str, split: str, where: str) -> datasets.Dataset:
    """A hub dataset's split, through the user's usual `datasets` cache (so a second run does not download again)."""
    try:
        return datasets.load_dataset(dataset_id, split=split)
    except (DatasetsError, OSError, ValueError) as error:
        raise ConfigError(f"{where}: no local file {dataset_id!r}, and no hub dataset split {split!r}: {root_cause(error)}") from None


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silences `datasets`' progress bars and error logs while it reads a small local file.

    A parse failure is reported once, as our ConfigError; the library's own log line about
    it would only repeat it with a traceback-like prefix. The previous state is restored.
    """
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def root_cause(error: BaseException) -> str:
    """The innermost cause on one line: `datasets` wraps the parser's useful message in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = " ".join(str(error).split())
    return message or type(error).__name__
