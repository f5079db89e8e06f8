"""The oracle kinds by name. Adding an oracle is one file and one line in `ORACLES`."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.oracles.base import Oracle, OracleConfig
from rlhf_bilevel.oracles.http import http_oracle
from rlhf_bilevel.oracles.judge import llm_judge_oracle
from rlhf_bilevel.oracles.python import PREFIX, python_oracle
from rlhf_bilevel.oracles.reward_model import reward_model_oracle
from rlhf_bilevel.oracles.rules import keyword_oracle, length_oracle
from rlhf_bilevel.oracles.sentiment import sentiment_oracle

ORACLES: dict[str, Callable[[OracleConfig], Oracle]] = {
    "sentiment": sentiment_oracle,
    "length": length_oracle,
    "keyword": keyword_oracle,
    "llm-judge": llm_judge_oracle,
    "reward-model": reward_model_oracle,
    "http": http_oracle,
}


def make_oracle(cfg: OracleConfig) -> Oracle:
    """The oracle `cfg.kind` names: an exact name, never a substring match, so a typo cannot pick
    another oracle. It is asked through a `labelling.Labeller`, which retries it."""
    if cfg.kind.startswith(PREFIX):
        return python_oracle(cfg)
    if cfg.kind not in ORACLES:
        close = difflib.get_close_matches(cfg.kind, ORACLES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        known = ", ".join(sorted(ORACLES))
        raise ConfigError(f"oracle.kind: unknown oracle {cfg.kind!r}{hint}; known: {known}, or {PREFIX}module:callable")
    return ORACLES[cfg.kind](cfg)
