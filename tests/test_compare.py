"""`rlhf-bilevel compare --quick`: the methods at one oracle budget, over seeds, in one or several processes."""

import json
import math
import re
from dataclasses import astuple

import pytest
from conftest import run_cli

import yaml

from rlhf_bilevel.commands.compare import METHODS, QUICK, merge, t_interval
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.recipe import load_recipe, recipe_dict
from test_train import TINY


def test_quick_comparison_spends_one_budget_on_every_method(tmp_path):
    out = tmp_path / "compare"
    result = run_cli(
        "compare", "--quick", "--recipe", str(TINY), "--out", str(out), "--prompts", "6", "--snapshots", "2", "--pairs-per-prompt", "2"
    )
    assert result.returncode == 0, result.stderr
    cfg = load_recipe(TINY, QUICK).bilevel
    budget = cfg.outer_steps * cfg.pairs_per_outer_step
    comparison = json.loads((out / "comparison.json").read_text())
    rows = comparison["runs"]
    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        assert row["oracle_pairs"] == budget, row["method"]
        pairs = [point["oracle_pairs"] for point in row["curve"]]
        assert pairs[0] == 0 and pairs[-1] == budget and pairs == sorted(set(pairs)), row["method"]
        seconds = [point["seconds"] for point in row["curve"]]
        assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] == pytest.approx(row["seconds"]), row["method"]
        assert 0 <= row["eval"]["win_rate"]["mean"] <= 1
        assert row["eval"]["samples"] == 2 and row["eval"]["gold"]["policy"]["n"] == 6
        assert (out / f"{row['method']}-seed0" / "eval" / "eval.json").is_file()
    # only the two methods that learn a reward model report its agreement, and at every snapshot too; the
    # last snapshot is the final policy and reward model, measured on the pairs the final evaluation scored
    assert ["agreement" in row["eval"] for row in rows] == [True, True, False]
    for row in rows[:2]:
        # before any label R_φ₀ is 0 everywhere (no judge here): it calls every decided pair a draw
        assert row["curve"][0]["agreement"] == 0.5 and all(0 <= point["agreement"] <= 1 for point in row["curve"][1:])
        assert row["curve"][-1]["agreement"] == pytest.approx(row["eval"]["agreement"]["policy"]["mean"])
        assert row["curve"][-1]["gold"] == pytest.approx(row["eval"]["gold"]["policy"]["mean"])
    assert not any("agreement" in point for point in rows[2]["curve"])
    # every method's policy has its KL at every snapshot: 0 at the reference, the final evaluation's at the end
    for row in rows:
        assert row["curve"][0]["kl"] == 0.0 and row["curve"][-1]["kl"] == pytest.approx(row["eval"]["kl"]) and "kl" in row["curve"][1]
    assert (out / "comparison-kl.png").stat().st_size > 0
    assert [len(over["curve"]) for over in comparison["summary"].values()] == [3, 3, 3]
    assert ["agreement" in point for point in comparison["summary"]["bilevel"]["curve"]] == [True, True, True]
    # one seed: the mean is that seed's number, the interval undefined rather than made up
    gold = comparison["summary"]["bilevel"]["gold"]
    assert gold["mean"] == rows[0]["eval"]["gold"]["policy"]["mean"] and math.isnan(gold["low"]) and math.isnan(gold["high"])
    assert "agreement_policy" not in comparison["summary"]["online-dpo"]
    runs_table, summary_table, differences_table, agreement_table = (out / "comparison.md").read_text().split("\n\n")
    assert len(agreement_table.splitlines()) == 2 + 2 * 3 and "| alternating | 1 | 0 | 0.500 [—] |" in agreement_table
    assert len(runs_table.splitlines()) == 2 + len(METHODS) and len(summary_table.splitlines()) == 2 + len(METHODS)
    assert "| online-dpo | 1 |" in summary_table and "[—]" in summary_table
    # each pair of methods, seed by seed: one seed's difference is that seed's, without an interval
    assert list(comparison["differences"]) == ["bilevel − alternating", "bilevel − online-dpo", "alternating − online-dpo"]
    difference = comparison["differences"]["bilevel − alternating"]
    assert difference["gold"]["mean"] == pytest.approx(rows[0]["eval"]["gold"]["policy"]["mean"] - rows[1]["eval"]["gold"]["policy"]["mean"])
    assert [point["oracle_pairs"] for point in difference["curve"]] == [point["oracle_pairs"] for point in rows[0]["curve"]]
    assert len(differences_table.splitlines()) == 2 + 3 and "| bilevel − alternating | 1 |" in differences_table
    # every line a run prints names it
    assert all(f"{m}/seed0: training on {budget} oracle pairs" in result.stdout for m in METHODS)
    assert all((out / name).stat().st_size > 0 for name in ("comparison.png", "comparison-time.png", "comparison-agreement.png"))


def test_t_interval_by_hand():
    # 1..5: mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445: 3 ± 2.776445 · sqrt(2.5 / 5)
    estimate = t_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.95)
    half = 2.776445 * math.sqrt(0.5)
    assert (estimate.mean, estimate.n) == (3.0, 5)
    assert estimate.low == pytest.approx(3 - half, abs=1e-6) and estimate.high == pytest.approx(3 + half, abs=1e-6)
    one = t_interval([0.4], 0.95)
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)


@pytest.fixture(autouse=True)
def one_thread_per_run(monkeypatch):
    """Runs in the CLI's own process on one torch thread, as each of two workers on 2 cores runs: the
    tiny model gains nothing from more, and OpenMP spinning makes it crawl on a busy machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def leaves(node, path=""):
    """(path, value) of every value in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def measured(comparison: dict) -> tuple[dict, dict]:
    """The runs' values but what the clock decides: the exact ones (names, counts), and the floats."""
    values = {path: value for path, value in leaves(comparison["runs"]) if "seconds" not in path}
    floats = {path: value for path, value in values.items() if isinstance(value, float)}
    return {path: value for path, value in values.items() if path not in floats}, floats


def test_two_processes_give_the_rows_of_one_and_a_t_interval_over_seeds(tmp_path):
    args = ["compare", "--quick", "--recipe", str(TINY), "--method", "alternating", "--seed", "0", "--seed", "1", "--prompts", "4", "--snapshots", "1",
            "--set", "bilevel.outer_steps=2"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    two = run_cli(*args, "--out", str(tmp_path / "two"), "--jobs", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    sequential, parallel = (json.loads((tmp_path / name / "comparison.json").read_text()) for name in ("one", "two"))
    (names, floats), (parallel_names, parallel_floats) = measured(sequential), measured(parallel)
    # equal up to float rounding: a worker's torch threads, cpu_count // 2, may split reductions otherwise
    assert parallel_names == names and parallel_floats == pytest.approx(floats, rel=1e-5, abs=1e-9, nan_ok=True)
    assert [(row["method"], row["seed"]) for row in sequential["runs"]] == [("alternating", 0), ("alternating", 1)]
    assert list(sequential["summary"]) == ["alternating"]
    assert all(f"alternating/seed{s}: training on" in two.stdout for s in (0, 1))
    # R_φ₀ measured once, by a worker, after the runs
    assert two.stdout.count("the reward model before any label orders") == 1
    assert ["agreement" in row["curve"][0] for row in parallel["runs"]] == [True, True]
    assert "FutureWarning" not in two.stderr  # the workers keep the command's warning filters
    # two seeds: mean ± t_{0.975, 1} · s/√2, where s/√2 = |a − b| / 2 (on KL: the tiny model's gold scores often tie)
    a, b = (row["eval"]["kl"] for row in sequential["runs"])
    assert a != b
    kl = sequential["summary"]["alternating"]["kl"]
    half = 12.7062047 * abs(a - b) / 2
    assert kl["mean"] == pytest.approx((a + b) / 2)
    assert kl["low"] == pytest.approx((a + b) / 2 - half) and kl["high"] == pytest.approx((a + b) / 2 + half)


def test_comparison_refuses_a_used_folder_and_bad_options(tmp_path):
    (tmp_path / "comparison.json").write_text("{}")
    used = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(tmp_path))
    assert used.returncode == 2 and "already holds a comparison" in used.stderr
    for option, message in [
        (["--snapshots", "0"], "snapshots: must be > 0"),
        (["--jobs", "0"], "--jobs: must be at least 1"),
        (["--method", "ppo"], "--method: unknown method 'ppo'"),
        (["--pairs-per-prompt", "0"], "--pairs-per-prompt: must be >= 1"),
    ]:
        bad = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(tmp_path / "x"), *option)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_sweep_runs_each_value_as_its_own_set_of_runs_and_flips_only_where_asked(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("compare", "--quick", "--recipe", str(TINY), "--method", "alternating", "--method", "online-dpo", "--prompts", "4",
                     "--snapshots", "1", "--set", "bilevel.outer_steps=1", "--sweep", "oracle.flip=0,0.25", "--out", str(out))
    assert result.returncode == 0, result.stderr
    comparison = json.loads((out / "comparison.json").read_text())
    rows = comparison["runs"]
    assert [(row["setting"], row["method"]) for row in rows] == [
        ("oracle.flip=0", "alternating"), ("oracle.flip=0", "online-dpo"), ("oracle.flip=0.25", "alternating"), ("oracle.flip=0.25", "online-dpo")
    ]
    budget = rows[0]["oracle_pairs"]
    assert all(row["oracle_pairs"] == budget for row in rows)
    # at 1/4 of the training labels, flips are all but certain in a budget of this size; evaluation labels are never flipped
    assert [row["labels_flipped"] > 0 for row in rows] == [False, False, True, True]
    assert list(comparison["summary"]) == [f"{m} (oracle.flip={v})" for v in ("0", "0.25") for m in ("alternating", "online-dpo")]
    # paired within a swept value only
    assert list(comparison["differences"]) == [f"alternating (oracle.flip={v}) − online-dpo (oracle.flip={v})" for v in ("0", "0.25")]
    for row in rows:
        assert (out / row["setting"] / f"{row['method']}-seed0" / "eval" / "eval.json").is_file()
    flipped = [json.loads(line) for line in (out / "oracle.flip=0.25" / "alternating-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert flipped[-1]["oracle/flipped"] == rows[2]["labels_flipped"]
    assert "| alternating (oracle.flip=0.25) | 1 |" in (out / "comparison.md").read_text()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [("oracle.flip", "--sweep: expected FIELD=VALUE,VALUE,..."), ("oracle.flip=0,0", "--sweep: each value once"),
     ("oracle.flip=0,0.5", "oracle.flip: must be in [0, 0.5)"), ("oracle.flipp=0", "oracle.flipp: unknown key")],
)
def test_a_bad_sweep_is_one_line_before_anything_runs(tmp_path, sweep, message):
    bad = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(tmp_path / "x"), "--sweep", sweep)
    assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "x").exists()


# -- merge: several comparisons as one ------------------------------------------------------------------
def estimate(mean: float, n: int = 4) -> dict:
    return {"mean": mean, "low": mean - 0.1, "high": mean + 0.1, "n": n}


def comparison_folder(path, gold: dict[tuple[str, int], float], *overrides: str, samples: int = 1, budget: int = 8, agreement: bool = False):
    """A finished comparison as `compare` leaves it, with made-up numbers: one row per (method, seed) of `gold`,
    its final gold score; each run folder holds its resolved recipe (with `overrides`), as `train` writes it.
    With `agreement`, the runs with a reward model measured it: 0.55 before any label, 0.6 + seed/10 halfway, 0.1 more at the end."""
    rows = []
    for (method, seed), final in gold.items():
        recipe = load_recipe(TINY, [*overrides, f"train.seed={seed}", f"train.threads={seed + 1}"]
                             + ([f"bilevel.method={method}"] if method != "online-dpo" else []))
        run = path / f"{method}-seed{seed}"
        run.mkdir(parents=True)
        if method != "online-dpo":  # TRL's runs keep no recipe
            (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
        halfway = 0.3 + (final - 0.3) / 2
        rows.append({
            "method": method, "seed": seed, "oracle_pairs": budget, "labels_flipped": 0, "seconds": 10.0 + seed,
            "eval": {"prompts": 4, "samples": samples, "seed": 0, "confidence": 0.95, "win_rate": estimate(0.6), "kl": 1.0 + seed,
                     "gold": {"reference": estimate(0.3), "policy": estimate(final)}},
            "curve": [{"oracle_pairs": p, "seconds": s, "gold": g} for p, s, g in ((0, 0.0, 0.3), (budget // 2, 5.0, halfway), (budget, 10.0, final))],
        })
        if agreement and method != "online-dpo":
            for point, value in zip(rows[-1]["curve"], (0.55, 0.6 + seed / 10, 0.7 + seed / 10)):
                point["agreement"] = value
    (path / "comparison.json").write_text(json.dumps({"runs": rows}))
    return path


def test_merge_pools_the_seeds_of_several_comparisons_into_one_report(tmp_path):
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6, ("alternating", 0): 0.5, ("bilevel", 1): 0.7, ("alternating", 1): 0.7})
    later = comparison_folder(tmp_path / "b", {("alternating", 2): 0.4, ("bilevel", 2): 0.65, ("online-dpo", 2): 0.45})
    result = run_cli("merge", "--from", str(first), "--from", str(later), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = json.loads((tmp_path / "merged" / "comparison.json").read_text())
    assert merged["sources"] == [str(first), str(later)]
    # the rows of both, in the order one comparison of every seed would give, each naming its run's folder
    assert [(row["method"], row["seed"]) for row in merged["runs"]] == [
        ("bilevel", 0), ("alternating", 0), ("bilevel", 1), ("alternating", 1), ("bilevel", 2), ("alternating", 2), ("online-dpo", 2)
    ]
    assert merged["runs"][-1]["folder"] == str(later / "online-dpo-seed2")
    # over all three seeds, as if one comparison had run them
    gold = merged["summary"]["bilevel"]["gold"]
    expected = t_interval([0.6, 0.7, 0.65], 0.95)
    assert merged["summary"]["bilevel"]["seeds"] == [0, 1, 2]
    assert (gold["mean"], gold["low"], gold["high"]) == pytest.approx((expected.mean, expected.low, expected.high))
    assert merged["summary"]["online-dpo"]["seeds"] == [2] and math.isnan(merged["summary"]["online-dpo"]["gold"]["low"])
    # paired on the seeds both ran: +0.1, 0, +0.25; a tie is not "higher"
    difference = merged["differences"]["bilevel − alternating"]
    paired = t_interval([0.1, 0.0, 0.25], 0.95)
    assert difference["seeds"] == [0, 1, 2] and difference["higher"] == 2
    assert (difference["gold"]["mean"], difference["gold"]["high"]) == pytest.approx((paired.mean, paired.high))
    assert [p["gold"]["mean"] for p in difference["curve"]] == pytest.approx([0.0, paired.mean / 2, paired.mean])
    assert merged["differences"]["bilevel − online-dpo"]["seeds"] == [2]
    assert "| bilevel − alternating | 3 | 0.117 [" in result.stdout and "| 2 of 3 |" in result.stdout
    assert (tmp_path / "merged" / "comparison.png").stat().st_size > 0
    # a merged comparison merges again: its rows name their runs' folders
    third = comparison_folder(tmp_path / "c", {("bilevel", 3): 0.8, ("alternating", 3): 0.6})
    again = merge([tmp_path / "merged", third], tmp_path / "again")
    assert again["summary"]["bilevel"]["seeds"] == [0, 1, 2, 3] and again["differences"]["bilevel − alternating"]["higher"] == 3
    # and keeps only the methods asked for
    two = merge([first, later], tmp_path / "two", methods=("bilevel", "online-dpo"))
    assert list(two["summary"]) == ["bilevel", "online-dpo"] and list(two["differences"]) == ["bilevel − online-dpo"]
    with pytest.raises(ConfigError, match="--method: the --from folders hold no run of online-dpo"):
        merge([first], tmp_path / "none", methods=("online-dpo",))


def test_merge_pools_the_agreement_along_the_runs_where_every_seed_measured_it(tmp_path):
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6, ("bilevel", 1): 0.7, ("online-dpo", 0): 0.5}, agreement=True)
    later = comparison_folder(tmp_path / "b", {("bilevel", 2): 0.65}, agreement=True)
    merged = merge([first, later], tmp_path / "merged")
    curve = merged["summary"]["bilevel"]["curve"]
    assert curve[0]["agreement"].mean == pytest.approx(0.55) and not any("agreement" in point for point in merged["summary"]["online-dpo"]["curve"])
    halfway, end = t_interval([0.6, 0.7, 0.8], 0.95), t_interval([0.7, 0.8, 0.9], 0.95)
    assert [curve[1]["agreement"].mean, curve[1]["agreement"].low, curve[2]["agreement"].mean] == pytest.approx([halfway.mean, halfway.low, end.mean])
    table = (tmp_path / "merged" / "comparison.md").read_text().split("\n\n")[-1]
    assert table.splitlines()[3:] == ["| bilevel | 3 | 4 | 0.700 [0.452, 0.948] |", "| bilevel | 3 | 8 | 0.800 [0.552, 1.048] |"]
    assert (tmp_path / "merged" / "comparison-agreement.png").stat().st_size > 0
    # a seed from a comparison that did not measure it leaves the pooled curve without agreement, not a partial mean
    older = comparison_folder(tmp_path / "c", {("bilevel", 3): 0.65})
    mixed = merge([first, older], tmp_path / "mixed")
    assert not any("agreement" in point for point in mixed["summary"]["bilevel"]["curve"])
    assert not (tmp_path / "mixed" / "comparison-agreement.png").exists()


def test_gold_per_sqrt_kl_over_seeds_and_seed_by_seed_where_every_policy_moved(tmp_path):
    # the made-up runs move KL 1 + seed from a reference of gold 0.3
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6, ("alternating", 0): 0.5, ("bilevel", 1): 0.7, ("alternating", 1): 0.7})
    merged = merge([first], tmp_path / "merged")
    bilevel, alternating = [0.3, 0.4 / math.sqrt(2)], [0.2, 0.4 / math.sqrt(2)]
    assert astuple(merged["summary"]["bilevel"]["gold_per_sqrt_kl"]) == pytest.approx(astuple(t_interval(bilevel, 0.95)))
    assert astuple(merged["summary"]["alternating"]["gold_per_sqrt_kl"]) == pytest.approx(astuple(t_interval(alternating, 0.95)))
    difference = merged["differences"]["bilevel − alternating"]["gold_per_sqrt_kl"]
    assert astuple(difference) == pytest.approx(astuple(t_interval([0.1, 0.0], 0.95)))
    differences_table = (tmp_path / "merged" / "comparison.md").read_text().split("\n\n")[2]
    # both methods of a seed moved as far, so at matched KL the difference is the final gold's: 0.1 and 0
    assert differences_table.splitlines()[2].endswith(f"| {difference.mean:.3f} [{difference.low:.3f}, {difference.high:.3f}] | 0.050 [-0.585, 0.685] |")
    assert (tmp_path / "merged" / "comparison-kl.png").stat().st_size > 0
    # a KL estimate at or below 0 (a policy that did not measurably move) has no ratio, and its method no mean of one
    runs = json.loads((first / "comparison.json").read_text())
    runs["runs"][1]["eval"]["kl"] = -0.01
    (first / "comparison.json").write_text(json.dumps(runs))
    unmoved = merge([first], tmp_path / "unmoved")
    assert "gold_per_sqrt_kl" in unmoved["summary"]["bilevel"] and "gold_per_sqrt_kl" not in unmoved["summary"]["alternating"]
    assert "gold_per_sqrt_kl" not in unmoved["differences"]["bilevel − alternating"]
    assert (tmp_path / "unmoved" / "comparison.md").read_text().split("\n\n")[2].splitlines()[2].endswith("| 1 of 2 | — | — |")


def test_gold_at_matched_kl_reads_the_run_that_moved_further_where_it_first_reached_the_other_s_kl(tmp_path):
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6, ("alternating", 0): 0.5, ("bilevel", 1): 0.7, ("alternating", 1): 0.7})
    runs = json.loads((first / "comparison.json").read_text())
    run = {(row["method"], row["seed"]): row for row in runs["runs"]}
    # seed 0: bilevel ends at KL 1; alternating passed √KL 3 (gold 0.55) before ending at √KL 2 (0.5), so it first
    # reached √KL 1 a third of the way from the reference (0, 0.3) to that snapshot: 0.3 + 0.25 / 3
    run["bilevel", 0]["eval"]["kl"] = 1.0
    run["alternating", 0]["eval"]["kl"] = 4.0
    run["alternating", 0]["curve"][1] |= {"kl": 9.0, "gold": 0.55}
    # seed 1: bilevel moved further (√KL 2, no snapshot KL) and is read at alternating's √2: 0.3 + 0.4 · √2 / 2
    run["bilevel", 1]["eval"]["kl"] = 4.0
    (first / "comparison.json").write_text(json.dumps(runs))
    merged = merge([first], tmp_path / "merged")
    expected = t_interval([0.6 - (0.3 + 0.25 / 3), (0.3 + 0.4 * math.sqrt(2) / 2) - 0.7], 0.95)
    matched = merged["differences"]["bilevel − alternating"]["gold_at_matched_kl"]
    assert astuple(matched) == pytest.approx(astuple(expected))
    differences_table = (tmp_path / "merged" / "comparison.md").read_text().split("\n\n")[2]
    assert differences_table.splitlines()[0].endswith("| gold at the lower KL of the two |")
    assert differences_table.splitlines()[2].endswith(f"| {matched.mean:.3f} [{matched.low:.3f}, {matched.high:.3f}] |")
    # a policy that did not measurably move has no KL to match
    run["alternating", 1]["eval"]["kl"] = 0.0
    (first / "comparison.json").write_text(json.dumps(runs))
    unmoved = merge([first], tmp_path / "unmoved")
    assert "gold_at_matched_kl" not in unmoved["differences"]["bilevel − alternating"]
    assert (tmp_path / "unmoved" / "comparison.md").read_text().split("\n\n")[2].splitlines()[2].endswith("| — | — |")


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"gold": {("bilevel", 0): 0.5}}, "--from: bilevel seed 0 is in both"),
        ({"samples": 3}, "--from: evaluation samples is 1 in"),
        ({"budget": 12}, "--from: bilevel spends 8 labels with snapshots at [0, 4, 8] in"),
        ({"overrides": ["reward.pool=mean"]}, "--from: recipe field reward.pool is 'sum' in"),
        ({"missing": True}, "holds no comparison.json; give the --out folder of a finished `rlhf-bilevel compare`"),
    ],
)
def test_merge_refuses_runs_that_do_not_compare_before_writing_anything(tmp_path, second, message):
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6, ("alternating", 0): 0.5})
    other = tmp_path / "b"
    if second.get("missing"):
        other.mkdir()
    else:
        comparison_folder(other, second.get("gold", {("bilevel", 1): 0.6}), *second.get("overrides", ()),
                          samples=second.get("samples", 1), budget=second.get("budget", 8))
    with pytest.raises(ConfigError, match=re.escape(message)):
        merge([first, other], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_is_one_line_for_a_user_mistake(tmp_path):
    first = comparison_folder(tmp_path / "a", {("bilevel", 0): 0.6})
    twice = run_cli("merge", "--from", str(first), "--from", str(first), "--out", str(tmp_path / "merged"))
    assert twice.returncode == 2 and len(twice.stderr.strip().splitlines()) == 1 and "bilevel seed 0 is in both" in twice.stderr, twice.stderr
    used = run_cli("merge", "--from", str(first), "--out", str(first), "--method", "ppo")
    assert used.returncode == 2 and "already holds a comparison" in used.stderr
    with pytest.raises(ConfigError, match="--method: unknown method 'ppo'"):
        merge([first], tmp_path / "merged", methods=("ppo",))
