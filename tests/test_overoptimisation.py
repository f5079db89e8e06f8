"""`rlhf-bilevel eval --all-checkpoints`: the best-of-n arithmetic against enumeration, then the curve of a tiny run."""

import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import run_cli

from rlhf_bilevel.commands.eval import curve_run, held_out_prompts, load_run
from rlhf_bilevel.commands.train import train
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.evaluate import EvalConfig
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.overoptimisation import CurveConfig, best_of_n, best_of_n_kl, evaluate_checkpoint
from rlhf_bilevel.types import LAMBDA
from test_train import RECIPES, tiny_recipe


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_is_the_mean_over_every_subset_of_the_draws(ties):
    # every n-subset of N = 6 draws, its best by the proxy kept (a tie shared evenly among the tied):
    # the estimator must give exactly the mean of those over the subsets
    generator = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    if ties:
        proxy = proxy.round()  # about half of each row ties with another draw
        assert any(len(row.unique()) < 6 for row in proxy)
    for n in range(1, 7):
        expected_proxy, expected_gold = [], []
        for p, g in zip(proxy.double(), gold.double()):
            subsets = list(itertools.combinations(range(6), n))
            best = [[i for i in s if p[i] == max(p[j] for j in s)] for s in subsets]
            expected_proxy.append(sum(p[b[0]] for b in best) / len(subsets))
            expected_gold.append(sum(g[b].mean() for b in best) / len(subsets))
        got_proxy, got_gold = best_of_n(proxy, gold, n)
        assert torch.allclose(got_proxy, torch.stack(expected_proxy)) and torch.allclose(got_gold, torch.stack(expected_gold))
    with pytest.raises(ValueError, match="at least 7 draws"):
        best_of_n(proxy, gold, 7)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_best_of_n_kl_is_the_limit_of_the_exact_kl(n):
    # Best-of-n over M equally likely responses with distinct rewards keeps the one of rank k with
    # probability p_k = (k^n − (k−1)^n)/M^n; its exact KL to the uniform draw, Σ p_k log(M p_k), stays
    # below log n − (n−1)/n and reaches it as M grows (within 1e-3 at M = 10⁵).
    m = 100_000
    k = torch.arange(1, m + 1, dtype=torch.float64)
    p = (k / m) ** n - ((k - 1) / m) ** n
    exact = (p * torch.log(m * p)).sum().item()
    assert exact <= best_of_n_kl(n) + 1e-12 and exact == pytest.approx(best_of_n_kl(n), abs=1e-3)


@pytest.mark.parametrize("best_of", [(1, 0), (4, 513), ()])
def test_best_of_out_of_range_is_refused(best_of):
    with pytest.raises(ConfigError, match="--best-of: each n must be between 1 and 512"):
        CurveConfig(best_of=best_of)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """Four outer steps saved every two: checkpoints 2 and 4, all kept."""
    run_dir = tmp_path_factory.mktemp("overopt") / "run"
    train(tiny_recipe(), run_dir, RECIPES)
    return run_dir


@pytest.fixture(scope="module")
def curve(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("curve")
    args = ["--prompts", "16", "--pairs-per-prompt", "2", "--resamples", "200", "--best-of", "1", "--best-of", "2", "--best-of", "4"]
    result = run_cli("eval", "--run", str(tiny_run), "--all-checkpoints", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "best-of-4" in result.stdout and "step 4" in result.stdout
    return out


def test_curve_has_one_finite_row_per_checkpoint(curve):
    report = json.loads((curve / "overoptimisation.json").read_text())
    assert [row["step"] for row in report["checkpoints"]] == [2, 4] and report["skipped"] == []
    for row in report["checkpoints"]:
        values = [row["kl"], row["gold"]["mean"], row["proxy"]["mean"], row["proxy_final"]["mean"], row["reference_proxy"]["mean"]]
        assert all(math.isfinite(v) for v in values), row
        # a sampled KL estimate can dip a rounding error below 0, not more
        assert row["kl"] > -1e-5 and row["sqrt_kl"] == pytest.approx(math.sqrt(max(row["kl"], 0)))
        assert row["gold"]["low"] <= row["gold"]["mean"] <= row["gold"]["high"]
    assert report["checkpoints"][0]["kl"] != report["checkpoints"][1]["kl"]  # each row measured its own policy
    assert report["checkpoints"][1]["oracle_pairs"] > report["checkpoints"][0]["oracle_pairs"] > 0
    # the final φ is the newest checkpoint's own: on the newest row the two proxies are one number
    assert report["checkpoints"][-1]["proxy_final"] == report["checkpoints"][-1]["proxy"]
    assert (curve / "overoptimisation.png").stat().st_size > 0


def test_reference_is_the_point_at_kl_zero(curve):
    reference = json.loads((curve / "overoptimisation.json").read_text())["reference"]
    # π_ref scored against itself: KL 0 up to the float error between sampling's and a fresh pass's logits
    assert reference["kl"] == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(reference["gold"]["mean"]) and math.isfinite(reference["proxy_final"]["mean"])


def test_best_of_n_rows(curve):
    report = json.loads((curve / "overoptimisation.json").read_text())
    bon = report["best_of_n"]
    assert [r["n"] for r in bon["rows"]] == [1, 2, 4] and bon["draws_per_prompt"] == 8
    assert [r["kl"] for r in bon["rows"]] == [0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4]
    # ranking by the proxy can only raise the proxy's expectation
    proxies = [r["proxy"]["mean"] for r in bon["rows"]]
    assert proxies == sorted(proxies)
    # n = 1 keeps a random draw of π_ref: the same mean proxy as the reference row, from independent draws
    # (16 prompts × 8 against 16 × 4). 4 standard errors of the difference of the two means, each
    # taken from the per-response spread, which is conservative (the prompts, shared, cancel in part)
    reference = report["reference"]
    std = reference["proxy_final_std"]
    tolerance = 4 * std * math.sqrt(1 / (16 * 8) + 1 / (16 * 4))
    assert bon["rows"][0]["proxy"]["mean"] == pytest.approx(reference["proxy_final"]["mean"], abs=tolerance)
    assert bon["rows"][0]["proxy"]["mean"] == pytest.approx(bon["reference"]["proxy"]["mean"])
    assert std > 0  # the trained reward model ranks responses, so the check above is not of two constants


def first_row_and_its_checkpoint_alone(run_dir, tmp_path):
    """The curve's row of the oldest checkpoint, and the same measures of the run cut back to that
    checkpoint and loaded afresh (the curve swaps every checkpoint's weights into one loaded model)."""
    cfg = CurveConfig(EvalConfig(prompts=6, resamples=100), best_of=(1,))
    row = curve_run(run_dir, cfg, tmp_path / "curve")["checkpoints"][0]
    cut = tmp_path / "cut"
    newer = [path.name for path in sorted(run_dir.glob("checkpoint-*"))[1:]]
    shutil.copytree(run_dir, cut, ignore=shutil.ignore_patterns(*newer))
    recipe, base_dir, policy, reward = load_run(cut)
    prompts = held_out_prompts(recipe, base_dir)[:6]
    alone, _ = evaluate_checkpoint(policy, LAMBDA, make_labeller(recipe.oracle), prompts, cfg.eval, reward)
    return row, alone


def test_each_row_is_its_checkpoint_alone(tiny_run, tmp_path, one_thread):
    row, alone = first_row_and_its_checkpoint_alone(tiny_run, tmp_path)
    assert row["step"] == 2
    assert {k: alone[k] for k in ("kl", "gold", "proxy")} == {k: row[k] for k in ("kl", "gold", "proxy")}


def test_a_reward_model_with_its_own_lora_is_swapped_too(tmp_path, one_thread):
    # the reward adapter's weights live in the policy model: a row that kept the newest ones would score
    # its responses with another proxy than its checkpoint's
    run_dir = tmp_path / "run"
    train(tiny_recipe("reward.lora=true", "bilevel.outer_steps=2", "train.save_every=1"), run_dir, RECIPES)
    row, alone = first_row_and_its_checkpoint_alone(run_dir, tmp_path)
    assert row["step"] == 1 and row["proxy"] == alone["proxy"] and row["proxy"] != row["proxy_final"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "x", "--recipe", "y", "--all-checkpoints"], "--all-checkpoints: needs --run"),
        (["--run", "x", "--best-of", "2"], "--best-of: only with --all-checkpoints"),
        (["--run", "x", "--all-checkpoints", "--best-of", "100000"], "--best-of: each n must be between 1 and 512"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
