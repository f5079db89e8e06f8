import json
import math
import threading
from pathlib import Path

import pytest
import torch

from rlhf_bilevel.config import ConfigError, build
from rlhf_bilevel.labelling import Labeller, make_labeller
from rlhf_bilevel.oracles import OracleConfig, OracleError, oracle_config
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.oracles.registry import config_class
from rlhf_bilevel.oracles.retry import GaveUp, retrying

USER_MODULE = '''
import threading

CALLS = []
RELEASE = threading.Event()

def flaky(prompts, first, second):
    CALLS.append(len(first))
    if len(CALLS) == 1:
        raise ConnectionError("reset by peer")
    return [0.75 for _ in first]

def dies_after_five_calls(prompts, responses):
    CALLS.append(len(responses))
    if len(CALLS) > 5:
        raise ConnectionError("judge went away")
    return [float(len(r)) for r in responses]

def hangs(prompts, responses):
    CALLS.append(len(responses))
    RELEASE.wait(30)
    return [1.0 for _ in responses]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "flaky_judges.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "flaky_judges"
    import sys

    module = sys.modules.pop("flaky_judges", None)
    if module is not None:
        module.RELEASE.set()  # frees the abandoned worker thread of the timeout test


class Scripted:
    """A fake oracle that answers from a script: an exception to raise, or a value to return."""

    name = "judge"
    offers = Offers.COMPARISON
    positional = False

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def next(self):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def compare(self, prompts, first, second):
        return self.next()


class ScriptedScorer(Scripted):
    offers = Offers.COMPARISON | Offers.SCORE

    def score(self, prompts, responses):
        return self.next()


def test_retrying_waits_backoff_doubling_and_returns_the_first_success():
    waits, attempts = [], []

    def call():
        attempts.append(1)
        if len(attempts) < 3:
            raise OracleError("busy")
        return "ok"

    assert retrying(call, retries=5, backoff=0.5, sleep=waits.append) == "ok"
    assert len(attempts) == 3 and waits == [0.5, 1.0]


def test_retrying_gives_up_naming_the_attempts_and_the_last_cause():
    causes = iter([OracleError("first cause"), OracleError("second cause"), OracleError("last cause")])

    def call():
        raise next(causes)

    with pytest.raises(GaveUp, match=r"^last cause \(gave up after 3 attempts, oracle\.retries=2\)$") as caught:
        retrying(call, retries=2, backoff=0.0, sleep=lambda s: None)
    assert str(caught.value.__cause__) == "last cause"


def test_without_retries_the_error_passes_unchanged():
    oracle = Scripted(OracleError("down"))
    with pytest.raises(OracleError) as caught:
        retrying(lambda: oracle.compare(["p"], ["a"], ["b"]), retries=0, backoff=1.0, sleep=pytest.fail)
    assert type(caught.value) is OracleError and str(caught.value) == "down" and oracle.calls == 1


@pytest.mark.parametrize("error", [ValueError("mismatched batch"), GaveUp("already retried")])
def test_bugs_and_final_errors_are_not_retried(error):
    oracle = Scripted(error, torch.tensor([0.5]))
    with pytest.raises(type(error)):
        retrying(lambda: oracle.compare(["p"], ["a"], ["b"]), retries=3, backoff=0.0, sleep=lambda s: None)
    assert oracle.calls == 1


@pytest.mark.parametrize(
    "bad",
    [torch.tensor([0.5, math.nan]), torch.tensor([0.5, 1.2]), torch.tensor([-0.1, 0.5]), torch.tensor([0.5]), "no"],
    ids=["nan", "above-one", "below-zero", "wrong-length", "not-numbers"],
)
def test_an_invalid_label_is_a_failed_attempt_and_is_retried(bad):
    labeller = Labeller(Scripted(bad, torch.tensor([0.25, 1.0])), retries=1)
    torch.testing.assert_close(labeller.ask(["p", "q"], ["a", "b"], ["c", "d"]), torch.tensor([0.25, 1.0]))
    assert labeller.oracle.calls == 2


def test_an_oracle_that_stays_invalid_stops_with_the_attempts_and_the_cause():
    labeller = Labeller(Scripted(*[torch.tensor([2.0])] * 3), retries=2)
    with pytest.raises(OracleError, match=r"^judge: P\(first ≻ second\) must be in \[0, 1\], got 2 for pair 0 \(gave up after 3 attempts"):
        labeller.ask(["p"], ["a"], ["b"])


def test_score_is_retried_and_asked_only_of_oracles_that_offer_it():
    scored = Labeller(ScriptedScorer(OracleError("flake"), torch.tensor([1.0, 2.0])), retries=1)
    assert scored.offers_score and scored.score(["p", "q"], ["a", "b"]).tolist() == [1.0, 2.0]
    judge = Labeller(Scripted())
    assert not judge.offers_score
    with pytest.raises(TypeError, match="offers no gold score"):
        judge.score(["p"], ["a"])
    assert judge.oracle.calls == 0
    assert make_labeller(oracle_config(kind="length")).offers_score  # the trainer logs gold scores by this


def test_make_oracle_retries_a_user_judge_that_raised(user_module):
    labeller = make_labeller(oracle_config(kind=f"python:{user_module}:flaky", pairwise=True, retries=2, backoff=0.0))
    torch.testing.assert_close(labeller.ask(["p", "q"], ["a", "b"], ["c", "d"]), torch.tensor([0.75, 0.75]))
    import flaky_judges

    assert flaky_judges.CALLS == [2, 2]


def test_a_user_call_that_hangs_times_out_and_is_retried(user_module):
    labeller = make_labeller(oracle_config(kind=f"python:{user_module}:hangs", timeout=0.05, retries=1, backoff=0.0))
    pattern = r"^python:flaky_judges:hangs: no answer within 0\.05 s \(oracle\.timeout\) \(gave up after 2 attempts, oracle\.retries=1\)$"
    with pytest.raises(OracleError, match=pattern):
        labeller.score(["p"], ["a"])
    import flaky_judges

    assert flaky_judges.CALLS == [1, 1]
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("oracle "))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"retries": -1}, r"^retries: must be ≥ 0, got -1$"),
        ({"backoff": -0.5}, r"^backoff: must be ≥ 0 seconds, got -0\.5$"),
        ({"kind": "http", "timeout": 0.0}, r"^timeout: must be > 0, got 0\.0$"),
    ],
)
def test_retry_fields_are_validated_and_named(data, match):
    with pytest.raises(ConfigError, match=match):
        config_class(data.get("kind", "sentiment"))(**data)
    with pytest.raises(ConfigError, match=r"^oracle\."):  # in a recipe, the section is named too
        build(OracleConfig, data, "oracle")

def test_a_run_whose_oracle_stays_down_stops_and_keeps_the_pairs_labelled_before(user_module, tmp_path):
    from rlhf_bilevel.commands.train import train
    from rlhf_bilevel.recipe import load_recipe

    recipes = Path(__file__).parents[1] / "recipes"
    overrides = [f"oracle.kind=python:{user_module}:dies_after_five_calls", "oracle.retries=1", "oracle.backoff=0", "train.tensorboard=false"]
    with pytest.raises(OracleError, match=r"raised ConnectionError: judge went away \(gave up after 2 attempts, oracle\.retries=1\)$"):
        train(load_recipe(recipes / "tiny-debug.yaml", overrides), tmp_path / "run", recipes)
    import flaky_judges

    assert len(flaky_judges.CALLS) == 7  # five answers, then two failed attempts
    kept = [json.loads(line) for line in (tmp_path / "run" / "preferences.jsonl").read_text().splitlines()]
    assert len(kept) >= 4 and all(0 <= record["prob"] <= 1 for record in kept)
