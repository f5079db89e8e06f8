"""Typed, frozen configuration: dataclasses built from plain dicts (YAML), with `a.b=value` overrides.

Every mistake names the key and says what would be accepted:
    ConfigError: bilevel.sigmaa: unknown key (did you mean 'sigma'?)

Two rules hold for every field, whatever its section: an int is a count, a size or a seed,
so it lies in [0, 2⁶³) (torch's int64, where a larger one would overflow deep inside a
tensor constructor); a float is finite and within float32's range (what the run computes in).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import yaml

from rlhf_bilevel.critic import CriticConfig
from rlhf_bilevel.queries import QueryConfig
from rlhf_bilevel.steps import StepConfig
from rlhf_bilevel.store import RewardFitConfig


INT_MAX = 2**63 - 1
FLOAT_MAX = float(torch.finfo(torch.float32).max)
EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SHOWN_CHARS = 60
"""A value quoted in an error is cut to this length: the message stays one readable line."""


class ConfigError(ValueError):
    """A user mistake in a recipe, an override or an option: one line, naming the field."""


class Variant(NamedTuple):
    """One class a `Variants` section may be read as, for the recipe reference and its schema."""

    name: str  # the value of the section's `key` that picks it, e.g. "http"; for a family of values, an example
    cls: type
    pattern: str  # a regular expression that every value picking it matches, e.g. ^http$, ^python:


class Variants:
    """A config section whose class depends on what it says, like an oracle's on its `kind`: `build`
    reads it as the class `variant` picks, so each variant takes only its own keys."""

    key = ""  # the field whose value picks the variant

    @classmethod
    def variants(cls) -> list[Variant]:
        """Every class the section may be read as; the recipe reference documents each."""
        return []

    @classmethod
    def variant(cls, data: dict) -> type:
        """The class that reads `data` (a subclass of `cls`, or `cls` itself); a ConfigError names the deciding key."""
        return cls

    @classmethod
    def chosen(cls, data: dict) -> str:
        """What `data` chose, for an error about a key the variant does not take, e.g. "the http oracle"."""
        return cls.__name__


@dataclass(frozen=True)
class BilevelConfig:
    method: Literal["bilevel", "alternating"] = field(
        default="bilevel", metadata={"help": "alternating: standard online RLHF, the policy and the reward model in turn, no λ′"}
    )
    pseudocode: Literal["corrected", "printed"] = field(
        default="corrected", metadata={"help": "printed: errata 1–3 as the paper prints them (docs/algorithm.md)"}
    )
    sigma: float = field(default=0.1, metadata={"help": "penalty σ (> 0): bias O(σ), noise amplified by 1/σ"})
    outer_steps: int = field(default=10, metadata={"help": "T, outer iterations (> 0)"})
    inner_steps: int = field(default=4, metadata={"help": "K, inner steps of λ and λ′ per outer iteration (> 0)"})
    pairs_per_step: int = field(default=8, metadata={"help": "B, oracle pairs per inner step (> 0); B·(K+1) per outer step"})
    trajectories_per_step: int = field(
        default=8, metadata={"help": "n, trajectories of π_λ per inner step, for the critic and eq. 12 (> 0)"}
    )
    responses_per_prompt: int = field(
        default=1, metadata={"help": "g: λ's n trajectories answer n/g prompts, g responses each (n a multiple of g; > 0)"}
    )
    gamma: float = field(default=1.0, metadata={"help": "discount γ, in (0, 1]"})
    beta: float = field(default=0.1, metadata={"help": "KL weight β of eq. 2 (≥ 0)"})
    upper_loss: Literal["bt_nll", "disagreement"] = field(
        default="bt_nll", metadata={"help": "the upper-level loss f of φ: Bradley–Terry negative log-likelihood, or disagreement"}
    )
    f_at: Literal["lambda_prime", "lambda"] = field(
        default="lambda_prime", metadata={"help": "the policy whose pairs ∇_φ f is taken on (erratum 4)"}
    )
    labels: Literal["sample", "expected"] = field(
        default="sample", metadata={"help": "sample: a Bernoulli label per pair; expected: P(first ≻ second) as a soft label"}
    )
    # common random numbers: d_t's ∇φĴ(λ) and ∇φĴ(λ′) on n trajectories each, drawn on the same
    # prompts and uniforms, so their difference (÷σ) loses most of its noise once λ′ ≈ λ while each
    # stays unbiased; costs one more rollout of n
    common_random_numbers: bool = field(
        default=False,
        metadata={"help": "draw ∇φĴ(λ) and ∇φĴ(λ′) on the same prompts and uniforms, one more rollout of n "
                          "(false: ∇φĴ(λ′) is taken on the f-pairs' rollout)"},
    )
    # the trunk's activations are those of `micro_batch` rows, for one more no-grad forward of the batch
    micro_batch: int | None = field(
        default=None, metadata={"help": "rows per forward+backward of log π in the λ and λ′ steps (> 0); null: the whole batch at once"}
    )
    policy_step: StepConfig = field(
        default_factory=lambda: StepConfig(rule="adam", lr=0.05, schedule="constant"), metadata={"help": "the steps of λ and λ′"}
    )
    reward_step: StepConfig = field(
        default_factory=lambda: StepConfig(rule="normalized", lr=0.1, schedule="inverse"), metadata={"help": "the steps of φ"}
    )
    reward_fit: RewardFitConfig = field(
        default_factory=RewardFitConfig, metadata={"help": "how φ learns from the labels: the preference store, several steps, a prior"}
    )
    query: QueryConfig = field(default_factory=QueryConfig, metadata={"help": "which pairs the oracle is asked about"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "the critic Q of Algorithm 2"})

    def __post_init__(self) -> None:
        positive(self, "sigma", "outer_steps", "inner_steps", "pairs_per_step", "trajectories_per_step", "responses_per_prompt")
        if self.trajectories_per_step % self.responses_per_prompt:
            raise ConfigError(
                f"responses_per_prompt: {self.responses_per_prompt} responses per prompt do not divide "
                f"trajectories_per_step={self.trajectories_per_step}; use a divisor of it"
            )
        # λ′'s pairs answer their prompts twice whatever this says, but λ's rows would each be alone
        # and fall back to the batch's baseline: an mc run under another name
        if self.critic.kind == "rloo" and self.responses_per_prompt < 2:
            raise ConfigError(
                "critic.kind: rloo baselines each response against the others to its prompt, and λ draws one per prompt; "
                "set bilevel.responses_per_prompt=4"
            )
        if self.micro_batch is not None:
            positive(self, "micro_batch")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma: must be in (0, 1], got {self.gamma}")
        if self.beta < 0:
            raise ConfigError(f"beta: must be ≥ 0, got {self.beta}")
        # steps.py and critic.py cannot raise a ConfigError (this module imports them), so the
        # ranges of their configs are checked here, where they are part of a recipe
        for name in ("policy_step", "reward_step"):
            step = getattr(self, name)
            positive(step, "lr", prefix=f"{name}.")
            if step.max_norm is not None:
                positive(step, "max_norm", prefix=f"{name}.")
            if step.weight_decay < 0:
                raise ConfigError(f"{name}.weight_decay: must be ≥ 0, got {step.weight_decay}")
        positive(self.reward_fit, "steps", prefix="reward_fit.")
        if self.query.candidates < 2:
            raise ConfigError(f"query.candidates: must be ≥ 2 (a pair is drawn from them), got {self.query.candidates}")
        # of two responses per prompt the one pair is the pair `random` asks about: the run would be the
        # random run under another name
        if self.query.select == "uncertain" and self.query.candidates < 3:
            raise ConfigError(
                f"query.candidates: select: uncertain needs ≥ 3 responses per prompt to choose among, got {self.query.candidates}; "
                "set bilevel.query.candidates=4"
            )
        if self.reward_fit.prior < 0:
            raise ConfigError(f"reward_fit.prior: must be ≥ 0, got {self.reward_fit.prior}")
        for name in ("half_life", "minibatch"):
            if getattr(self.reward_fit, name) is not None:
                positive(self.reward_fit, name, prefix="reward_fit.")
        positive(self.critic, "lr", "blocks", "target_every", "batch_size", "replay_capacity", prefix="critic.")
        if self.critic.radius is not None:
            positive(self.critic, "radius", prefix="critic.")
        if self.critic.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"critic.optimizer: must be one of adam, sgd; got {shown(self.critic.optimizer)}")

    @property
    def pairs_per_outer_step(self) -> int:
        """The oracle budget of one outer iteration: B·(K+1) (docs/algorithm.md)."""
        return self.pairs_per_step * (self.inner_steps + 1)


def positive(cfg: Any, *names: str, prefix: str = "") -> None:
    """Each field `names` of `cfg` is > 0; `prefix` is where `cfg` sits in its parent config."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ConfigError(f"{prefix}{name}: must be > 0, got {value}")


def read_text(path: Path, where: str) -> str:
    """A file the user named, as UTF-8 text; one that cannot be read or decoded is a ConfigError on `where`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read {path} ({error.strerror or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise ConfigError(f"{where}: {path} is not valid UTF-8 (byte {byte:#04x} at offset {error.start})") from None


def shown(value: Any) -> str:
    """`repr(value)`, cut short: a recipe may hold a megabyte where a number belongs."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


def build(cls: type, data: Any, where: str = "", base: Any = None) -> Any:
    """A frozen dataclass from a dict, checking every key and every type. A key left out keeps its
    value in `base` (a section's default in its parent, e.g. `bilevel.policy_step`'s Adam), else
    the class's default."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__}")
    chosen = ""
    if issubclass(cls, Variants):
        # left out, the key that picks the variant is the base's too
        picked = data if base is None or not cls.key or cls.key in data else {cls.key: getattr(base, cls.key), **data}
        try:
            variant = cls.variant(picked)
        except ConfigError as error:
            raise ConfigError(f"{where}.{error}" if where else str(error)) from None
        chosen = f" for {cls.chosen(picked)}"
        cls = variant
        if base is not None and type(base) is not cls:
            # another variant's default (the recipe's sentiment oracle when the file asks for http):
            # only its values of the keys this variant takes carry over
            takes = {f.name for f in dataclasses.fields(cls) if f.init}
            base = cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name in takes})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{path}: unknown key{chosen}{hint}")
        inner = getattr(base, key) if base is not None else section_default(fields[key])
        values[key] = convert(hints[key], value, path, inner)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required" if where else f"{name}: required")
    try:
        return cls(**values) if base is None else dataclasses.replace(base, **values)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}" if where else str(error)) from None


def section_default(f: dataclasses.Field) -> Any:
    """The default of a field whose default is a config section, else None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        return default if dataclasses.is_dataclass(default) else None
    return None


def convert(hint: Any, value: Any, path: str, base: Any = None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, base)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}; got {shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {shown(value)}")
        return origin(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        # abs() first: float() of an int beyond 1e308 raises OverflowError rather than giving inf
        if not (abs(value) <= FLOAT_MAX and math.isfinite(value)):
            raise ConfigError(f"{path}: must be a finite number of size at most {FLOAT_MAX:.3g} (float32), got {shown(value)}")
        return float(value)
    if hint is int and type(value) is int and not 0 <= value <= INT_MAX:
        raise ConfigError(f"{path}: must be a whole number from 0 to 2**63 - 1, got {shown(value)}")
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is Any:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{path}: expected {expected}, got {shown(value)}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` sets data['a']['b']; the value is parsed as YAML (numbers, booleans, lists)."""
    data = copy_tree(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. bilevel.sigma=0.05")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node[leaf] = value
    return data


def copy_tree(data: dict) -> dict:
    return {k: copy_tree(v) if isinstance(v, dict) else v for k, v in data.items()}
