"""A training recipe: one YAML file, validated into one frozen `Recipe`, with `--set a.b=value` overrides.

    model:    {name: smollm2, dtype: bfloat16}
    bilevel:  {sigma: 0.1, outer_steps: 20, inner_steps: 2}
    oracle:   {kind: sentiment}
    prompts:  {train: data/prompts-train.jsonl, eval: data/prompts-eval.jsonl}

Every section but `prompts` has defaults. Relative paths in a recipe are read from the
recipe's own folder, so a recipe and its data move together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_bilevel.config import BilevelConfig, ConfigError, apply_overrides, build, positive, read_text
from rlhf_bilevel.lm.heads import RewardConfig
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig
from rlhf_bilevel.lm.policy import RolloutConfig
from rlhf_bilevel.oracles.base import OracleConfig
from rlhf_bilevel.prompts import PromptConfig


MAX_THREADS = 1024
"""More CPU threads than any machine has cores: each one is an OS thread, made at once."""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    save_every: int = 5  # outer steps between checkpoints; the last step always saves one
    keep: int | None = 2  # newest checkpoints kept; None keeps all
    eval_every: int = 1  # outer steps between evaluations (the first and last always run)
    eval_pairs: int = 16  # held-out prompts, two responses each: reward-model agreement and gold score
    tensorboard: bool = True
    max_bad_steps: int = 10  # the run stops once one block (λ, λ′, φ, a critic) skips this many non-finite updates in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: each process's own GPU (cuda:LOCAL_RANK) when there is one, else the CPU
    # give freed tensors back to the OS at once (glibc: a fixed mmap threshold, allocator.py): peak
    # memory then is one phase's, not the high-water of every phase before it, for page faults
    # on every large tensor (a few % to ~15 % of a step's time, measured on SmolLM2)
    return_freed_memory: bool = False
    # torch's CPU threads: their number decides how sums are split, so the same seed gives the same
    # numbers only at the same count. null: the cores this process may use (its share of them when a
    # launch starts several processes on one machine), whatever OMP_NUM_THREADS says; run.json records it
    threads: int | None = None

    def __post_init__(self) -> None:
        positive(self, "save_every", "eval_every", "eval_pairs", "max_bad_steps")
        if self.threads is not None and not 0 < self.threads <= MAX_THREADS:
            raise ConfigError(f"threads: from 1 to {MAX_THREADS} (or null: this process's cores), got {self.threads}")
        if self.keep is not None:
            positive(self, "keep")


@dataclass(frozen=True)
class Recipe:
    prompts: PromptConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # lm/policy.py's config has no checks of its own; 0 would fail inside sampling with a traceback
        positive(self.rollout, "max_new_tokens", "max_prompt_tokens", prefix="rollout.")
        if self.bilevel.query.select == "uncertain" and self.reward.heads < 2:
            raise ConfigError(
                f"bilevel.query.select: uncertain needs an ensemble to measure uncertainty; set reward.heads ≥ 2 (got {self.reward.heads})"
            )


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--recipe: no such file: {path}")
    try:
        data = yaml.safe_load(read_text(path, "--recipe"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"--recipe: {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--recipe: {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_recipe(data: dict[str, Any], overrides: list[str] = ()) -> Recipe:
    return build(Recipe, apply_overrides(data, list(overrides)))


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` with `overrides` (`a.b=value`) applied, checked key by key."""
    return parse_recipe(read_yaml(path), overrides)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (tuples as lists), ready for YAML or JSON."""

    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [plain(v) for v in node]
        return node

    return plain(dataclasses.asdict(recipe))
