"""What every oracle shares: its protocol, its config, its error, and the step from a gold score to a preference.

An oracle answers P(first ≻ second) for a batch of prompt-matched pairs, and knows nothing of
the algorithm. It says what it offers (`Offers`): every oracle compares; most are a
per-response gold score behind a Bradley–Terry link (`ScoredOracle`) and offer that score
too, so a run can log the gold reward of what its policy writes. A judge that reads the two
responses one after the other declares itself `positional`, and is asked in both orders.
Only `rlhf_bilevel.labelling` asks an oracle anything.

A bad answer is never repaired: a wrong length, a NaN, a probability outside [0, 1] or an
exception in user code is an `OracleError`, because a guessed label silently corrupts the
very data the reward model is fitted to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Flag, auto
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from rlhf_bilevel.config import ConfigError, Variant, Variants, positive, shown

DEFAULT_QUESTION = "Which response answers the prompt better: more helpful, more correct and clearer?"


class OracleError(RuntimeError):
    """The oracle could not give a verdict; raised rather than a guessed label."""


class Offers(Flag):
    """What an oracle answers; nothing else is asked of it."""

    COMPARISON = auto()  # compare(prompts, first, second) -> [N] P(first ≻ second)
    SCORE = auto()  # score(prompts, responses) -> [N] a gold score per response: the run's gold metrics


class Oracle(Protocol):
    name: str  # what its errors are prefixed with
    offers: Offers
    # True: compare() answers for the order the two responses are shown in (a judge reading them
    # one after the other prefers a position), so the labeller asks each pair both ways round
    positional: bool

    def compare(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> Tensor:
        """P(first ≻ second) for each pair, in [0, 1]; raises OracleError, never guesses."""

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> Tensor:
        """[N] gold score of each response; asked only of an oracle that offers `Offers.SCORE`."""


@dataclass(frozen=True)
class OracleConfig(Variants):
    """The settings every oracle kind takes: which kind, and how the labeller asks it. Each kind takes
    its own subclass (the registry's `ORACLES`), chosen by `kind` when a recipe is read."""

    kind: str = field(
        default="sentiment",
        metadata={"help": "a registered name (sentiment, length, keyword, llm-judge, reward-model, http) or python:module:callable"},
    )
    retries: int = field(
        default=3, metadata={"help": "attempts after a failed one (exception, timeout, invalid label) before the run stops (≥ 0)"}
    )
    backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry (≥ 0), doubled before each next one"})
    # Below 1/2, so a flipped label is still more often right than wrong: at 1/2 labels carry no
    # information, above it they teach the opposite preference
    flip: float = field(
        default=0.0,
        metadata={"help": "probability in [0, 0.5) that a training label is flipped (a noisy annotator); evaluation is never flipped"},
    )

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"retries: must be ≥ 0, got {self.retries}")
        if self.backoff < 0:
            raise ConfigError(f"backoff: must be ≥ 0 seconds, got {self.backoff}")
        if not 0 <= self.flip < 0.5:
            raise ConfigError(f"flip: must be in [0, 0.5), the probability a training label is flipped; got {self.flip}")

    key = "kind"
    # The kinds by name, set by registry.py: it imports every kind's module, each of which imports
    # this one, so this one cannot import it. The package's __init__ imports the registry, so the
    # hooks are set before anything of `rlhf_bilevel.oracles` can be used.
    config_class: ClassVar[Callable[[str], type[OracleConfig]]]  # a kind's name -> its config class; ConfigError if unknown
    kinds: ClassVar[Callable[[], list[Variant]]]  # every kind, with its config class

    @classmethod
    def variants(cls) -> list[Variant]:
        return OracleConfig.kinds() if cls is OracleConfig else []

    @classmethod
    def variant(cls, data: dict) -> type:
        if cls is not OracleConfig:
            return cls
        kind = data.get("kind", OracleConfig.kind)
        if not isinstance(kind, str):  # before any other key: which keys are known depends on it
            raise ConfigError(f"kind: expected str, got {shown(kind)}")
        return OracleConfig.config_class(kind)

    @classmethod
    def chosen(cls, data: dict) -> str:
        return f"the {data.get('kind', OracleConfig.kind)} oracle"


@dataclass(frozen=True)
class ScoredConfig(OracleConfig):
    """An oracle behind a gold score (`ScoredOracle`): sentiment, and the base of every scored kind."""

    labels: Literal["bradley_terry", "deterministic"] = field(
        default="bradley_terry", metadata={"help": "how a score difference becomes P(first ≻ second)"}
    )
    temperature: float = field(
        default=0.1, metadata={"help": "Bradley–Terry temperature on gold-score differences (> 0); smaller is closer to deterministic"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "temperature")


@dataclass(frozen=True)
class JudgeConfig(OracleConfig):
    """What a judge shown two responses is asked (llm-judge, http)."""

    question: str = field(default=DEFAULT_QUESTION, metadata={"help": "what the judge is asked about the two responses"})
    choices: tuple[str, ...] = field(
        default=("A", "B"), metadata={"help": "the judge's names for the response shown first and second"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.question.strip():
            raise ConfigError("question: must not be blank")
        names = [c.strip().casefold() for c in self.choices]  # an http judge's reply is read ignoring case
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise ConfigError(f"choices: expected two different non-blank labels, e.g. [A, B], got {list(self.choices)}")


Scorer = Callable[[Sequence[str], Sequence[str]], Any]
"""A gold score per response: fn(prompts, responses) -> list/array/tensor of floats."""


class ScoredOracle:
    """An oracle behind a per-response gold score s: P(first ≻ second) = sigmoid((s₁ − s₂) / temperature).

    With `labels: deterministic` the preferred response gets probability 1 (0.5 on a tie),
    the noiseless oracle that the Bradley–Terry one tends to as the temperature goes to 0.
    """

    offers = Offers.COMPARISON | Offers.SCORE
    positional = False

    def __init__(self, name: str, scorer: Scorer, cfg: ScoredConfig):
        self.name = name
        self.scorer = scorer
        self.labels = cfg.labels
        self.temperature = cfg.temperature

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """[N] gold score of each response to its prompt; finite, or an OracleError."""
        check_batch(prompts, responses)
        scores = as_vector(self.name, self.scorer(prompts, responses), len(responses), "scores")
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise OracleError(f"{self.name}: score {scores[i].item()} for response {i} is not finite")
        return scores

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
        check_batch(prompts, first, second)
        # One scorer call for both sides: a batched judge (a model, an API) pays its overhead once.
        n = len(prompts)
        scores = self.score([*prompts, *prompts], [*first, *second])
        margin = scores[:n] - scores[n:]
        if self.labels == "deterministic":
            return (torch.sign(margin) + 1) / 2
        return torch.sigmoid(margin / self.temperature)


def check_batch(prompts: Sequence[Any], *responses: Sequence[Any]) -> None:
    """One response per prompt: a mismatch is the caller's bug, which zip would silently truncate."""
    lengths = [len(prompts), *map(len, responses)]
    if len(set(lengths)) != 1:
        raise ValueError(f"one response per prompt expected, got batches of lengths {lengths}")


def as_vector(name: str, values: Any, n: int, what: str) -> Tensor:
    """An oracle's answer as a [n] float tensor on the CPU, or an OracleError saying what was wrong."""
    try:
        vector = torch.as_tensor(values, device="cpu").detach().to(torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as error:
        raise OracleError(f"{name}: {what} are not a list of numbers ({one_line(error)})") from error
    if vector.shape != (n,):
        raise OracleError(f"{name}: expected {n} {what}, one per pair or response, got shape {tuple(vector.shape)}")
    return vector


def check_probabilities(name: str, values: Any, n: int) -> Tensor:
    """A judge's P(first ≻ second): n numbers, each in [0, 1] (NaN is not)."""
    prob = as_vector(name, values, n, "probabilities")
    outside = ~((prob >= 0) & (prob <= 1))  # NaN compares false both ways, so it is caught here too
    if outside.any():
        bad = prob[outside][0].item()
        raise OracleError(f"{name}: P(first ≻ second) must be in [0, 1], got {bad:.6g} for pair {int(outside.nonzero()[0])}")
    return prob


def one_line(error: BaseException) -> str:
    """An exception as `Type: message` on one line, for error messages that must stay one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@contextmanager
def as_oracle_model() -> Iterator[None]:
    """Loading a judging model reuses the policy's loader, whose errors name `model.name`: here
    the user set `oracle.model`, so that is the field the error names."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        if not message.startswith("model.name:"):
            raise
        raise ConfigError(f"oracle.model{message.removeprefix('model.name')}") from None
