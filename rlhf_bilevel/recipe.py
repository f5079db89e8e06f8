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
from rlhf_bilevel.oracles.base import OracleConfig, ScoredConfig
from rlhf_bilevel.oracles.registry import config_class
from rlhf_bilevel.prompts import PromptConfig


MAX_THREADS = 1024
"""More CPU threads than any machine has cores: each one is an OS thread, made at once."""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = field(default=0, metadata={"help": "seed of the adapters' and heads' initialisation and of every draw"})
    save_every: int = field(default=5, metadata={"help": "outer steps between checkpoints (> 0); the last step always saves one"})
    keep: int | None = field(default=2, metadata={"help": "newest checkpoints kept (> 0); null keeps all"})
    eval_every: int = field(default=1, metadata={"help": "outer steps between evaluations (> 0); the first and last always run"})
    eval_pairs: int = field(
        default=16, metadata={"help": "held-out prompts, two responses each (> 0): reward-model agreement and gold score"}
    )
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events beside metrics.jsonl"})
    max_bad_steps: int = field(
        default=10,
        metadata={"help": "the run stops once one block (λ, λ′, φ, a critic) skips this many non-finite updates in a row (> 0)"},
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "auto: each process's own GPU (cuda:LOCAL_RANK) when there is one, else the CPU"}
    )
    # glibc: a fixed mmap threshold (allocator.py); page faults on every large tensor cost a few % to
    # ~15 % of a step's time, measured on SmolLM2
    return_freed_memory: bool = field(
        default=False,
        metadata={"help": "give freed tensors back to the OS at once: peak memory is one phase's, not the high-water of every phase before it"},
    )
    # their number decides how sums are split, so the same seed gives the same numbers only at the same count
    threads: int | None = field(
        default=None,
        metadata={"help": "torch's CPU threads (1–1024); null: the cores this process may use (its share when a launch "
                          "starts several processes on one machine), whatever OMP_NUM_THREADS says; run.json records it"},
    )

    def __post_init__(self) -> None:
        positive(self, "save_every", "eval_every", "eval_pairs", "max_bad_steps")
        if self.threads is not None and not 0 < self.threads <= MAX_THREADS:
            raise ConfigError(f"threads: from 1 to {MAX_THREADS} (or null: this process's cores), got {self.threads}")
        if self.keep is not None:
            positive(self, "keep")


@dataclass(frozen=True)
class Recipe:
    prompts: PromptConfig = field(metadata={"help": "the prompts to train and evaluate on (required)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the frozen base model"})
    adapters: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "the LoRA adapters of λ, λ′ (and of φ with reward.lora)"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "how responses are sampled and scored"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "the learned reward r_φ"})
    oracle: OracleConfig = field(
        default_factory=ScoredConfig, metadata={"help": "who labels the pairs; each kind takes these fields and those of its own table"}
    )
    bilevel: BilevelConfig = field(default_factory=BilevelConfig, metadata={"help": "the algorithm: Algorithm 1 or the alternating baseline"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "seed, checkpoints, evaluation and the device"})

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
    return build(Recipe, apply_overrides(for_oracle_override(data, list(overrides)), list(overrides)))


def for_oracle_override(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` without the oracle settings that an overridden `oracle.kind` does not take: a run's recipe,
    e.g. a sentiment oracle's with its temperature, can be evaluated with `--set oracle.kind=http`. Only
    what the file says is dropped; an override the new kind does not take is still an error."""
    kind = apply_overrides({}, [o for o in overrides if o.partition("=")[0].strip() == "oracle.kind"]).get("oracle", {}).get("kind")
    section = data.get("oracle")
    if not isinstance(kind, str) or not isinstance(section, dict):
        return data
    try:
        takes = {f.name for f in dataclasses.fields(config_class(kind))}
    except ConfigError:  # an unknown kind: reading the recipe reports it
        return data
    return {**data, "oracle": {key: value for key, value in section.items() if key in takes}}


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
