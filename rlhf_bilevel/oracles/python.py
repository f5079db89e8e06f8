"""`python:module:callable`: a user's own scorer or pairwise judge, imported by name.

This is how a project plugs in a judge of its own (an API call, a reward model) without
editing the package. The user's code is called inside a guard: whatever it raises, or
whatever malformed answer it returns, becomes a one-line OracleError naming the callable.
User code may wait on a service with no deadline of its own, so each call gets `oracle.timeout`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.oracles.base import Offers, OracleError, ScoredConfig, ScoredOracle, check_batch, check_probabilities, one_line
from rlhf_bilevel.oracles.retry import within

PREFIX = "python:"


@dataclass(frozen=True)
class PythonConfig(ScoredConfig):
    pairwise: bool = field(
        default=False, metadata={"help": "the callable judges pairs, fn(prompts, first, second) -> P, rather than scoring responses"}
    )
    timeout: float = field(default=60.0, metadata={"help": "seconds a call may take before that attempt has failed (> 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "timeout")


def python_oracle(cfg: PythonConfig) -> ScoredOracle | PairwiseOracle:
    """A scorer, fn(prompts, responses) -> floats, behind Bradley–Terry; or, with `pairwise`, a judge."""
    fn = load_callable(cfg.kind)
    if cfg.pairwise:
        return PairwiseOracle(cfg.kind, fn, cfg.timeout)

    def guarded(prompts: Sequence[str], responses: Sequence[str]) -> Any:
        return call_user(cfg.kind, fn, cfg.timeout, prompts, responses)

    return ScoredOracle(cfg.kind, guarded, cfg)


class PairwiseOracle:
    """A judge that only compares; its P(first ≻ second) is taken as it is, whatever order it reads the pair in."""

    offers = Offers.COMPARISON
    positional = False

    def __init__(self, name: str, judge: Callable[..., Any], timeout: float):
        self.name, self.judge, self.timeout = name, judge, timeout

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
        check_batch(prompts, first, second)
        return check_probabilities(self.name, call_user(self.name, self.judge, self.timeout, prompts, first, second), len(prompts))


def load_callable(kind: str) -> Callable[..., Any]:
    """Imports `python:package.module:name`; every way of naming nothing callable is a ConfigError on oracle.kind."""
    module_name, _, attribute = kind.removeprefix(PREFIX).partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"oracle.kind: expected python:module:callable, e.g. python:my_judges:score, got {kind!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"oracle.kind: cannot import {module_name!r} for {kind!r} ({one_line(error)})") from None
    try:
        fn = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"oracle.kind: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(fn):
        raise ConfigError(f"oracle.kind: {kind!r} is a {type(fn).__name__}, not a callable")
    return fn


def call_user(name: str, fn: Callable[..., Any], timeout: float, *args: Sequence[str]) -> Any:
    """Calls user code within `timeout` seconds; anything it raises is an OracleError, so no failed call can become a label."""

    def guarded() -> Any:
        try:
            return fn(*args)
        except Exception as error:  # user code may raise anything; all of it means "no verdict"
            raise OracleError(f"{name} raised {one_line(error)}") from error

    return within(timeout, guarded, name)
