import math

import pytest
import torch

from rlhf_bilevel.config import ConfigError, build
from rlhf_bilevel.oracles import ORACLES, OracleConfig, OracleError, ScoredOracle, make_oracle, oracle_config
from rlhf_bilevel.oracles.base import Offers, ScoredConfig
from rlhf_bilevel.oracles.rules import LengthConfig

USER_MODULE = '''
import math

def score(prompts, responses):
    return [len(p) + len(r) for p, r in zip(prompts, responses)]

def judge(prompts, first, second):
    return [0.9 if a.startswith("yes") else 0.2 for a in first]

def broken(prompts, responses):
    raise KeyError("no api key")

def nan_score(prompts, responses):
    return [math.nan for _ in responses]

def short(prompts, responses):
    return [1.0]

def overconfident(prompts, first, second):
    return [1.3 for _ in first]

def nan_judge(prompts, first, second):
    return [math.nan for _ in first]

def words(prompts, responses):
    return ["many" for _ in responses]

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_judges"


def fixed_scores(scores: dict[str, float], **cfg) -> ScoredOracle:
    return ScoredOracle("fixed", lambda prompts, responses: [scores[r] for r in responses], oracle_config(**cfg))


def test_bradley_terry_is_sigmoid_of_score_difference_over_temperature():
    oracle = fixed_scores({"a": 1.0, "b": 0.5, "c": 1.0}, temperature=0.25)
    prob = oracle.compare(["p"] * 3, ["a", "b", "a"], ["b", "a", "c"])
    expected = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0)), 0.5]  # (1 − 0.5)/0.25 = 2
    torch.testing.assert_close(prob, torch.tensor(expected))


def test_deterministic_labels_prefer_the_higher_score_and_split_ties():
    oracle = fixed_scores({"a": 1.0, "b": 0.5, "c": 1.0}, labels="deterministic")
    prob = oracle.compare(["p"] * 3, ["a", "b", "a"], ["b", "a", "c"])
    assert prob.tolist() == [1.0, 0.0, 0.5]


def test_temperature_must_be_positive_and_is_named():
    with pytest.raises(ConfigError, match=r"^oracle\.temperature: must be > 0, got 0\.0$"):
        build(OracleConfig, {"temperature": 0.0}, "oracle")
    with pytest.raises(ConfigError, match=r"^oracle\.labels: must be one of bradley_terry, deterministic"):
        build(OracleConfig, {"labels": "soft"}, "oracle")
    cfg = build(OracleConfig, {"kind": "keyword", "keywords": ["thanks", "great"]}, "oracle")
    assert cfg.keywords == ("thanks", "great")


def test_sentiment_prefers_the_obviously_positive_response():
    oracle = make_oracle(oracle_config(kind="sentiment", temperature=0.1))
    positive, negative = "What a wonderful, lovely day, I love it!", "This is awful, I hate it and feel miserable."
    scores = oracle.score(["Describe your day."] * 2, [positive, negative])
    assert scores[0] > 0.5 and scores[1] < -0.5  # VADER compound scores, in [−1, 1]
    prob = oracle.compare(["Describe your day."], [positive], [negative])
    torch.testing.assert_close(prob, torch.sigmoid((scores[0:1] - scores[1:2]) / 0.1))
    assert prob.item() > 0.99


def test_length_counts_words_or_distance_to_a_target():
    longer = make_oracle(oracle_config(kind="length"))
    assert longer.score(["p", "p", "p"], ["one two three", "  one  ", ""]).tolist() == [3.0, 1.0, 0.0]
    target = make_oracle(oracle_config(kind="length", target_words=4))
    assert target.score(["p", "p"], ["one two three", "a b c d e f"]).tolist() == [-1.0, -2.0]
    assert make_oracle(oracle_config(kind="length", target_words=4, labels="deterministic")).compare(
        ["p"], ["one two three"], ["a b c d e f"]
    ).tolist() == [1.0]
    with pytest.raises(ConfigError, match=r"^target_words: must be ≥ 0 or null, got -1$"):
        LengthConfig(target_words=-1)


def test_keyword_counts_whole_words_case_insensitively():
    oracle = make_oracle(oracle_config(kind="keyword", keywords=("great", "thank you", "c++")))
    responses = ["Great, thank you! A GREAT day.", "greatly thankful", "I like C++ and c++.", "great-grandmother"]
    assert oracle.score(["p"] * 4, responses).tolist() == [3.0, 0.0, 2.0, 1.0]


def test_keyword_oracle_needs_keywords():
    with pytest.raises(ConfigError, match=r"^oracle\.keywords: the keyword oracle needs at least one keyword"):
        make_oracle(oracle_config(kind="keyword"))
    with pytest.raises(ConfigError, match=r"^oracle\.keywords\[1\]: a keyword must not be blank$"):
        make_oracle(oracle_config(kind="keyword", keywords=("good", " ")))


def test_unknown_kind_lists_the_known_ones_and_suggests():
    with pytest.raises(ConfigError) as caught:
        oracle_config(kind="sentimnet")
    with pytest.raises(ConfigError, match=str(caught.value).replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        make_oracle(ScoredConfig(kind="sentimnet"))  # a config built in code is checked when the oracle is made
    message = str(caught.value)
    assert message.startswith("oracle.kind: unknown oracle 'sentimnet' (did you mean 'sentiment'?); known: ")
    assert all(kind in message for kind in ORACLES) and "python:module:callable" in message
    assert "\n" not in message


def test_python_scorer_is_imported_and_gives_bradley_terry(user_module):
    oracle = make_oracle(oracle_config(kind=f"python:{user_module}:score", temperature=2.0))
    assert oracle.score(["ab", "abc"], ["x", "yy"]).tolist() == [3.0, 5.0]
    prob = oracle.compare(["ab"], ["xyz"], ["x"])  # scores 5 and 3
    torch.testing.assert_close(prob, torch.tensor([1 / (1 + math.exp(-1.0))]))


def test_python_pairwise_judge_returns_its_probabilities_and_has_no_score(user_module):
    oracle = make_oracle(oracle_config(kind=f"python:{user_module}:judge", pairwise=True))
    prob = oracle.compare(["p", "q"], ["yes please", "no"], ["a", "b"])
    torch.testing.assert_close(prob, torch.tensor([0.9, 0.2]))
    assert oracle.offers == Offers.COMPARISON


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("python:my_judges", r"^oracle\.kind: expected python:module:callable"),
        ("python:no_such_module_xyz:f", r"^oracle\.kind: cannot import 'no_such_module_xyz'"),
        ("python:my_judges:missing", r"^oracle\.kind: module 'my_judges' has no attribute 'missing'$"),
        ("python:my_judges:NOT_CALLABLE", r"^oracle\.kind: 'python:my_judges:NOT_CALLABLE' is a int, not a callable$"),
    ],
)
def test_python_kind_that_names_no_callable_is_a_config_error(user_module, kind, match):
    with pytest.raises(ConfigError, match=match):
        make_oracle(oracle_config(kind=kind))


def test_user_code_exceptions_become_one_line_oracle_errors(user_module):
    oracle = make_oracle(oracle_config(kind=f"python:{user_module}:broken", retries=0))  # retries: test_oracle_retry.py
    with pytest.raises(OracleError, match=r"^python:my_judges:broken raised KeyError: 'no api key'$") as caught:
        oracle.compare(["p"], ["a"], ["b"])
    assert isinstance(caught.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("name", "pairwise", "match"),
    [
        ("nan_score", False, r"^python:my_judges:nan_score: score nan for response 0 is not finite$"),
        ("short", False, r"expected 4 scores, one per pair or response, got shape \(1,\)"),
        ("words", False, r"scores are not a list of numbers"),
        ("overconfident", True, r"must be in \[0, 1\], got 1\.3 for pair 0$"),
        ("nan_judge", True, r"must be in \[0, 1\], got nan for pair 0"),
    ],
)
def test_bad_answers_are_oracle_errors_not_labels(user_module, name, pairwise, match):
    oracle = make_oracle(oracle_config(kind=f"python:{user_module}:{name}", pairwise=pairwise, retries=0))
    with pytest.raises(OracleError, match=match):
        oracle.compare(["p", "q"], ["a", "b"], ["c", "d"])


def test_mismatched_batches_are_refused_rather_than_truncated():
    with pytest.raises(ValueError, match=r"lengths \[2, 2, 1\]"):
        fixed_scores({"a": 1.0}).compare(["p", "q"], ["a", "a"], ["a"])


def test_each_kind_reads_its_own_config_and_refuses_another_kinds_key():
    from rlhf_bilevel.recipe import load_recipe
    from test_train import TINY

    cfg = load_recipe(TINY, ["oracle.kind=sentiment", "oracle.temperature=0.2"]).oracle
    assert type(cfg) is ORACLES["sentiment"].config and cfg.temperature == 0.2 and not hasattr(cfg, "keywords")
    with pytest.raises(ConfigError, match=r"^oracle\.url: unknown key for the keyword oracle \(known: kind, .*keywords\)$"):
        load_recipe(TINY, ["oracle.url=http://x"])
    with pytest.raises(ConfigError, match=r"^oracle\.temperature: unknown key for the llm-judge oracle"):
        build(OracleConfig, {"kind": "llm-judge", "temperature": 0.1}, "oracle")
    for kind, entry in ORACLES.items():
        assert type(oracle_config(kind=kind)) is entry.config
    with pytest.raises(ConfigError, match=r"^oracle\.kind: expected str, got 5$"):
        load_recipe(TINY, ["oracle.kind=5"])


def test_overriding_the_kind_drops_the_settings_of_the_kind_before():
    """A run's recipe holds every setting of its oracle; `--set oracle.kind=...` (eval with another judge) starts
    the new kind from its defaults, keeping the settings it shares, and refuses an override it does not take."""
    from rlhf_bilevel.recipe import load_recipe
    from test_train import TINY

    cfg = load_recipe(TINY, ["oracle.retries=5", "oracle.kind=llm-judge"]).oracle
    assert type(cfg) is ORACLES["llm-judge"].config and cfg.retries == 5
    with pytest.raises(ConfigError, match=r"^oracle\.keywords: unknown key for the llm-judge oracle"):
        load_recipe(TINY, ["oracle.kind=llm-judge", "oracle.keywords=[a]"])


def test_a_config_of_another_kind_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^oracle: the keyword oracle takes a KeywordConfig, got a ScoredConfig$"):
        make_oracle(ScoredConfig(kind="keyword"))
