"""The oracle kinds by name. Adding an oracle is one file (its config class and its factory) and one
line in `ORACLES`."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, NamedTuple

from rlhf_bilevel.config import ConfigError, Variant, build
from rlhf_bilevel.oracles.base import Oracle, OracleConfig, ScoredConfig
from rlhf_bilevel.oracles.http import HttpConfig, http_oracle
from rlhf_bilevel.oracles.judge import LLMJudgeConfig, llm_judge_oracle
from rlhf_bilevel.oracles.python import PREFIX, PythonConfig, python_oracle
from rlhf_bilevel.oracles.reward_model import RewardModelConfig, reward_model_oracle
from rlhf_bilevel.oracles.rules import KeywordConfig, LengthConfig, keyword_oracle, length_oracle
from rlhf_bilevel.oracles.sentiment import sentiment_oracle


class Kind(NamedTuple):
    config: type[OracleConfig]  # the settings the kind takes
    make: Callable[[Any], Oracle]  # its config -> the oracle


ORACLES: dict[str, Kind] = {
    "sentiment": Kind(ScoredConfig, sentiment_oracle),
    "length": Kind(LengthConfig, length_oracle),
    "keyword": Kind(KeywordConfig, keyword_oracle),
    "llm-judge": Kind(LLMJudgeConfig, llm_judge_oracle),
    "reward-model": Kind(RewardModelConfig, reward_model_oracle),
    "http": Kind(HttpConfig, http_oracle),
}
PYTHON = Kind(PythonConfig, python_oracle)


def kind_of(name: str) -> Kind:
    """The kind `name` names: an exact name, never a substring match, so a typo cannot pick another oracle."""
    if name.startswith(PREFIX):
        return PYTHON
    if name not in ORACLES:
        close = difflib.get_close_matches(name, ORACLES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        known = ", ".join(sorted(ORACLES))
        raise ConfigError(f"kind: unknown oracle {name!r}{hint}; known: {known}, or {PREFIX}module:callable")
    return ORACLES[name]


def config_class(name: str) -> type[OracleConfig]:
    """The config class of the oracle kind `name` (what `OracleConfig.variant` reads a recipe's section as)."""
    return kind_of(name).config


def kinds() -> list[Variant]:
    """Every kind with its config class: the named ones, then the python: family."""
    # the names are words and hyphens, the same in Python's and in JSON Schema's regular expressions
    named = [Variant(name, kind.config, f"^{name}$") for name, kind in ORACLES.items()]
    return [*named, Variant(f"{PREFIX}module:callable", PYTHON.config, f"^{PREFIX}")]


OracleConfig.config_class, OracleConfig.kinds = staticmethod(config_class), staticmethod(kinds)


def oracle_config(**settings: Any) -> OracleConfig:
    """The config of the kind `settings['kind']` names (default sentiment), checked as a recipe's `oracle` section is."""
    return build(OracleConfig, settings, "oracle")


def make_oracle(cfg: OracleConfig) -> Oracle:
    """The oracle `cfg` configures. It is asked through a `labelling.Labeller`, which retries it."""
    try:
        kind = kind_of(cfg.kind)
    except ConfigError as error:
        raise ConfigError(f"oracle.{error}") from None
    if not isinstance(cfg, kind.config):
        raise ConfigError(f"oracle: the {cfg.kind} oracle takes a {kind.config.__name__}, got a {type(cfg).__name__}")
    return kind.make(cfg)
