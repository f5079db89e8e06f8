"""Retries with back-off (tenacity): a flaky judge costs time, never a guessed label.

An attempt fails when it raises an `OracleError` (a user scorer that raised, a server that is
down or timed out, an answer that is not a label). Failed attempts are repeated
`oracle.retries` times, waiting `oracle.backoff` seconds and twice as long each time after,
and then the run stops with one line that says how many attempts were made and why the last
one failed. Any other exception (a ValueError for mismatched batches, a bug) is not retried:
it would fail the same way every time; nor is a `GaveUp`, which no retry can fix.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from rlhf_bilevel.oracles.base import OracleError

T = TypeVar("T")


class GaveUp(OracleError):
    """A final OracleError: its retries ran out, or no retry could fix it (a refused key); no retry
    around it repeats them."""


def retryable(error: BaseException) -> bool:
    return isinstance(error, OracleError) and not isinstance(error, GaveUp)


def retrying(call: Callable[[], T], retries: int, backoff: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, attempted up to 1 + `retries` times while it raises a retryable OracleError; the wait
    before retry i (from 1) is backoff · 2^(i−1) seconds. With no retries the error passes as it is."""

    def give_up(state: tenacity.RetryCallState) -> T:
        error = state.outcome.exception()
        if retries == 0:
            raise error
        raise GaveUp(f"{error} (gave up after {state.attempt_number} attempts, oracle.retries={retries})") from error

    policy = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retryable),
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_exponential(multiplier=backoff, exp_base=2, min=0),
        sleep=sleep,
        retry_error_callback=give_up,
    )
    return policy(call)


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
