"""`rlhf-bilevel compare --quick`: three methods, one oracle budget, one evaluation, one table and one plot."""

import json

from conftest import run_cli

from rlhf_bilevel.compare import METHODS, QUICK
from rlhf_bilevel.recipe import load_recipe
from test_train import TINY


def test_quick_comparison_spends_one_budget_on_every_method(tmp_path):
    out = tmp_path / "compare"
    result = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(out), "--prompts", "6", "--snapshots", "2")
    assert result.returncode == 0, result.stderr
    cfg = load_recipe(TINY, QUICK).bilevel
    budget = cfg.outer_steps * cfg.pairs_per_outer_step
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        assert row["oracle_pairs"] == budget, row["method"]
        pairs = [p for p, _ in row["curve"]]
        assert pairs[0] == 0 and pairs[-1] == budget and pairs == sorted(set(pairs)), row["method"]
        assert 0 <= row["eval"]["win_rate"]["mean"] <= 1
        assert (out / f"{row['method']}-seed0" / "eval" / "eval.json").is_file()
    # only the two methods that learn a reward model report its agreement
    assert ["agreement" in row["eval"] for row in rows] == [True, True, False]
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + len(METHODS) and all(m in result.stdout for m in METHODS)
    assert (out / "comparison.png").stat().st_size > 0


def test_comparison_refuses_a_used_folder_and_bad_options(tmp_path):
    (tmp_path / "comparison.json").write_text("[]")
    used = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(tmp_path))
    assert used.returncode == 2 and "already holds a comparison" in used.stderr
    bad = run_cli("compare", "--quick", "--recipe", str(TINY), "--out", str(tmp_path / "x"), "--snapshots", "0")
    assert bad.returncode == 2 and "snapshots: must be > 0" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
