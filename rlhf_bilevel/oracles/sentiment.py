"""The sentiment oracle: humans are replaced by VADER, and a happier response is preferred.

VADER is a lexicon and rules, so it runs on a CPU in microseconds per response and
needs no download: the classic "make the model positive" RLHF task without a judge model.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_bilevel.oracles.base import ScoredConfig, ScoredOracle


def sentiment_oracle(cfg: ScoredConfig) -> ScoredOracle:
    """Gold score = VADER's compound score of the response, in [−1, 1]; the prompt is ignored."""
    analyzer = SentimentIntensityAnalyzer()  # loads the lexicon: once per oracle, not per call

    def compound(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [analyzer.polarity_scores(response)["compound"] for response in responses]

    return ScoredOracle("sentiment", compound, cfg)
