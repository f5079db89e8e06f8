"""A judge that is shown two responses and names the better one: the question it is asked.

Judges, language models especially, tend to prefer whichever response is shown first (or
second) whatever it says. Such a judge answers for the order it was shown
(`Oracle.positional`), and the labeller asks it each pair both ways round
(`labelling.both_orders`), so that a constant position bias cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from rlhf_bilevel.oracles.base import JudgeConfig

FirstNamed = Callable[[list[str]], Tensor]
"""[N] the probability that the judge names the response shown first, for each of N questions."""


def question_text(cfg: JudgeConfig, prompt: str, shown_first: str, shown_second: str) -> str:
    a, b = cfg.choices
    return (
        f"{cfg.question}\n\nPrompt:\n{prompt}\n\nResponse {a}:\n{shown_first}\n\n"
        f"Response {b}:\n{shown_second}\n\nReply with {a} or {b} only."
    )


def ask_as_shown(first_named: FirstNamed, cfg: JudgeConfig, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
    """P(the judge names `first`) with `first` shown first, from one call of `first_named` on all N
    questions, so that a batched judge pays its overhead once."""
    return first_named([question_text(cfg, p, a, b) for p, a, b in zip(prompts, first, second)])
