"""AI-preference oracles: P(first ≻ second) for pairs of responses, from a gold score or a judge."""

from rlhf_bilevel.oracles.base import OracleConfig, OracleError, ScoredOracle
from rlhf_bilevel.oracles.registry import ORACLES, make_oracle, oracle_config

__all__ = ["ORACLES", "OracleConfig", "OracleError", "ScoredOracle", "make_oracle", "oracle_config"]
