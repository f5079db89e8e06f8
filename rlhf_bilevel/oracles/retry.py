"""Retries with back-off around every oracle: a flaky judge costs time, never a guessed label.

An attempt fails when the oracle raises an `OracleError` (a user scorer that raised, a
server that is down or timed out) or answers something that is not a label (a NaN, a
probability outside [0, 1], the wrong number of answers). Failed attempts are repeated
`oracle.retries` times, waiting `oracle.backoff` seconds and twice as long each time after,
and then the run stops with one line that says how many attempts were made and why the
last one failed. Pairs labelled before that call are already on disk (the trainer writes
each batch as it arrives), so nothing paid for is lost.

Any other exception (a ValueError for mismatched batches, a bug) is not retried: it would
fail the same way every time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import Tensor

from rlhf_bilevel.oracles.base import OracleConfig, OracleError, check_batch, check_probabilities
from rlhf_bilevel.types import Oracle

T = TypeVar("T")


class GaveUp(OracleError):
    """A final OracleError: its retries ran out, or no retry could fix it (a refused key); no retry
    around it repeats them."""


def retrying(call: Callable[[], T], retries: int, backoff: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, attempted up to 1 + `retries` times while it raises an OracleError; the wait
    before retry i (from 1) is backoff · 2^(i−1) seconds. With no retries the error passes as it is."""
    failures = 0
    while True:
        try:
            return call()
        except GaveUp:
            raise
        except OracleError as error:
            failures += 1
            if retries == 0:
                raise
            if failures > retries:
                raise GaveUp(f"{error} (gave up after {failures} attempts, oracle.retries={retries})") from error
            sleep(backoff * 2 ** (failures - 1))


def within(seconds: float, call: Callable[[], T], what: str) -> T:
    """`call()` in a daemon thread, or an OracleError once `seconds` have passed without an answer.

    Python cannot stop a thread: a call that hangs is abandoned, still running, and a daemon
    thread so that it cannot keep the process alive after the run.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread, which re-raises it
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"oracle {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise OracleError(f"{what}: no answer within {seconds:g} s (oracle.timeout)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class Retrying:
    """An oracle whose every call is validated and retried as `oracle.retries` and `oracle.backoff` say."""

    def __init__(self, oracle: Oracle, cfg: OracleConfig, timeout: float | None = None):
        self.oracle, self.name = oracle, cfg.kind
        self.retries, self.backoff, self.timeout = cfg.retries, cfg.backoff, timeout

    def attempt(self, call: Callable[[], T]) -> T:
        if self.timeout is None:
            return retrying(call, self.retries, self.backoff)
        return retrying(lambda: within(self.timeout, call, self.name), self.retries, self.backoff)

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
        check_batch(prompts, first, second)  # the caller's bug: no retry would fix it
        return self.attempt(lambda: check_probabilities(self.name, self.oracle.compare(prompts, first, second), len(prompts)))


class RetryingScored(Retrying):
    """The same, for an oracle with a gold score: `score` is retried too, and stays visible, since
    the trainer logs gold scores exactly when its oracle has `score`."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return self.attempt(lambda: self.oracle.score(prompts, responses))


def with_retries(oracle: Oracle, cfg: OracleConfig, timeout: float | None = None) -> Retrying:
    """`oracle` behind retries; `timeout` bounds each attempt for oracles that cannot bound their own."""
    kind = RetryingScored if hasattr(oracle, "score") else Retrying
    return kind(oracle, cfg, timeout)
