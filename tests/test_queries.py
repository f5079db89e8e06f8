"""Active queries: the pair the ensemble disagrees on most, and the same oracle budget as random pairs."""

import json

import pytest
import torch

from conftest import run_cli
from rlhf_bilevel.queries import PairQuery, QueryConfig, most_uncertain_pairs
from rlhf_bilevel.sampling import consecutive_pairs
from rlhf_bilevel.types import PreferencePairs, Rollout
from test_train import TINY


def rollout_of(rows: int, horizon: int) -> Rollout:
    mask = torch.ones(rows, horizon)
    zeros = torch.zeros(rows, horizon)
    return Rollout([None] * rows, [None] * rows, torch.zeros(rows, horizon, dtype=torch.long), mask, zeros, zeros, torch.full((rows,), 1 / rows))


def disagreeing_members() -> torch.Tensor:
    """[members, rows, horizon] rewards of three members on two prompts × three candidates, horizon 2;
    members agree on every response but the ones named below."""
    totals = torch.tensor([
        [[0.0, 1.0, 5.0], [2.0, 2.0, 0.0]],   # member 0
        [[0.0, 1.0, -5.0], [2.0, 2.0, 0.0]],  # member 1
        [[0.0, 1.0, 0.0], [2.0, -3.0, 0.0]],  # member 2
    ])
    return totals.reshape(3, 6).unsqueeze(-1).expand(3, 6, 2) / 2  # R = Σ_h r over a horizon of 2


def test_the_pair_whose_members_disagree_most_is_chosen_within_each_prompt():
    pairs = most_uncertain_pairs(disagreeing_members(), rollout_of(6, 2), candidates=3)
    # prompt 0: response 2 is where the members split (5, −5, 0); its margin to response 0 or 1 spreads
    # alike, and the first of the tied pairs in row order is (0, 2). Prompt 1: response 4 (2, 2, −3),
    # against response 3 (margins 0, 0, 5) or 5 (2, 2, −3): the same spread, so (3, 4)
    assert pairs.first.tolist() == [0, 3] and pairs.second.tolist() == [2, 4]
    assert torch.allclose(pairs.weight, torch.full((2,), 0.5))


class Source:
    """Draws `rollout_of` rows: `size` per prompt for a group, two per prompt for random pairs."""

    def __init__(self):
        self.asked = []

    def pairs(self, adapter: str, n: int) -> PreferencePairs:
        self.asked.append(("pairs", adapter, n))
        return consecutive_pairs(rollout_of(2 * n, 2))

    def groups(self, adapter: str, n: int, size: int) -> Rollout:
        self.asked.append(("groups", adapter, n, size))
        return rollout_of(n * size, 2)


class Ensemble:
    def member_rewards(self, rollout: Rollout) -> torch.Tensor:
        return disagreeing_members()


def test_a_query_draws_random_pairs_or_the_ensembles_most_uncertain_ones():
    source = Source()
    random = PairQuery(source, Ensemble(), QueryConfig())("lambda_prime", 2)
    assert source.asked == [("pairs", "lambda_prime", 2)] and random.first.tolist() == [0, 2]
    uncertain = PairQuery(source, Ensemble(), QueryConfig(select="uncertain", candidates=3))("lambda_prime", 2)
    assert source.asked[-1] == ("groups", "lambda_prime", 2, 3)
    assert uncertain.first.tolist() == [0, 3] and uncertain.second.tolist() == [2, 4]


def test_uncertain_queries_train_at_the_same_budget_and_need_an_ensemble(tmp_path):
    run = run_cli(
        "train", "--recipe", str(TINY), "--output-dir", str(tmp_path / "run"), "--set", "bilevel.outer_steps=1",
        "--set", "reward.heads=2", "--set", "bilevel.query.select=uncertain", "--set", "bilevel.query.candidates=3",
    )
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "run" / "preferences.jsonl").read_text().splitlines()
    outer = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"outer"' in line]
    assert len(lines) == outer[-1]["oracle/pairs"] == 4 * 3  # B·(K+1) with B = 4, K = 2, as with random pairs
    single = run_cli(
        "train", "--recipe", str(TINY), "--output-dir", str(tmp_path / "x"), "--set", "bilevel.query.select=uncertain",
        "--set", "bilevel.query.candidates=3",
    )
    assert single.returncode == 2 and single.stderr.count("\n") == 1 and "reward.heads" in single.stderr
    assert not (tmp_path / "x").exists()


def test_uncertain_selection_among_two_responses_is_refused_as_the_random_run_it_would_be():
    from rlhf_bilevel.config import ConfigError
    from rlhf_bilevel.recipe import load_recipe

    chosen = ["reward.heads=2", "bilevel.query.select=uncertain"]
    with pytest.raises(ConfigError, match=r"^bilevel\.query\.candidates: select: uncertain needs ≥ 3 .*got 2; set bilevel\.query\.candidates=4$"):
        load_recipe(TINY, chosen)
    assert load_recipe(TINY, [*chosen, "bilevel.query.candidates=3"]).bilevel.query.candidates == 3
