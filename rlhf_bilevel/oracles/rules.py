"""Rule-based oracles whose gold score can be checked by hand: response length and keyword counts.

They make a run's target obvious (the policy should get longer, or say a word more
often), which is what a test or a first experiment on a new model needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.oracles.base import ScoredConfig, ScoredOracle


@dataclass(frozen=True)
class LengthConfig(ScoredConfig):
    target_words: int | None = field(
        default=None, metadata={"help": "null rewards longer responses, else closeness to this word count (≥ 0)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_words is not None and self.target_words < 0:
            raise ConfigError(f"target_words: must be ≥ 0 or null, got {self.target_words}")


@dataclass(frozen=True)
class KeywordConfig(ScoredConfig):
    keywords: tuple[str, ...] = field(
        default=(), metadata={"help": "the words whose occurrences are counted (case-insensitive, whole words; at least one)"}
    )


def length_oracle(cfg: LengthConfig) -> ScoredOracle:
    """Gold score = word count, or −|words − target_words| when a target is set."""
    target = cfg.target_words

    def words(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        counts = [len(response.split()) for response in responses]
        return [float(c) if target is None else -float(abs(c - target)) for c in counts]

    return ScoredOracle("length", words, cfg)


def keyword_oracle(cfg: KeywordConfig) -> ScoredOracle:
    """Gold score = occurrences of any keyword in the response, case-insensitive, whole words only."""
    if not cfg.keywords:
        raise ConfigError("oracle.keywords: the keyword oracle needs at least one keyword, e.g. oracle.keywords=[thanks, great]")
    for i, keyword in enumerate(cfg.keywords):
        if not keyword.strip():
            raise ConfigError(f"oracle.keywords[{i}]: a keyword must not be blank")
    # Longest first, so that 'good day' is counted once rather than as 'good'; the look-arounds
    # (not \b) keep whole-word matching right for keywords that start or end in punctuation.
    alternatives = "|".join(re.escape(k.strip()) for k in sorted(cfg.keywords, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def occurrences(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(len(pattern.findall(response))) for response in responses]

    return ScoredOracle("keyword", occurrences, cfg)
