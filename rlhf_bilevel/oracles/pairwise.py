"""A judge that is shown two responses and names the better one, asked in both orders.

Judges, language models especially, tend to prefer whichever response is shown first (or
second) whatever it says. Each pair is therefore asked twice, once as (first, second) and
once swapped, and the two verdicts are averaged:

    P(first ≻ second) = (P_AB(A) + 1 − P_BA(A)) / 2

where P_AB(A) is the probability that the judge names the response shown first when
`first` is shown first. A constant position bias adds the same amount to both terms and
cancels, and swapping `first` and `second` gives exactly 1 − P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from rlhf_bilevel.oracles.base import OracleConfig

FirstNamed = Callable[[list[str]], Tensor]
"""[N] the probability that the judge names the response shown first, for each of N questions."""


def question_text(cfg: OracleConfig, prompt: str, shown_first: str, shown_second: str) -> str:
    a, b = cfg.choices
    return (
        f"{cfg.question}\n\nPrompt:\n{prompt}\n\nResponse {a}:\n{shown_first}\n\n"
        f"Response {b}:\n{shown_second}\n\nReply with {a} or {b} only."
    )


def ask_both_orders(
    first_named: FirstNamed, cfg: OracleConfig, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
) -> Tensor:
    """P(first ≻ second) per pair, from one call of `first_named` on all 2N questions, so that a
    batched judge pays its overhead once."""
    n = len(prompts)
    shown_first, shown_second = [*first, *second], [*second, *first]
    texts = [question_text(cfg, p, a, b) for p, a, b in zip([*prompts, *prompts], shown_first, shown_second)]
    p = first_named(texts)
    return (p[:n] + 1 - p[n:]) / 2
