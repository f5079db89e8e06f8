"""The command line end to end: the quick lab's artefacts, and one-line errors for bad values."""

import json

import pytest
from conftest import run_cli


@pytest.mark.parametrize(
    "args, field",
    [
        (["--sigma", "0"], "sigma"),
        (["--sigma", "-1"], "sigma"),
        (["--horizon", "0"], "horizon"),
        (["--vocab", "1"], "vocab"),
        (["--vocab", "8", "--horizon", "5"], "vocab=8, horizon=5"),
        (["--beta", "0"], "beta"),
        (["--fixed-points", "-1"], "--fixed-points"),
        (["--reward-hidden", "-2"], "reward_hidden"),
    ],
)
def test_bad_values_give_one_line_errors(tmp_path, args, field):
    result = run_cli("theory", "--quick", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_quick_lab_writes_json_and_png(tmp_path):
    result = run_cli("theory", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "theory.json").read_text())
    for key in ("phi_star", "fixed_points", "gap_sq", "slope", "sigma", "B", "replay_bias", "oracle_pairs"):
        assert key in data
    assert set(data["gap_sq"]) == {"exact", "sampled", "alternating", "printed", "exact_replay", "exact_replay_steps", "sampled_replay"}
    assert len(data["gap_sq"]["exact"]) == 40 and len(data["gap_sq"]["sampled"]) == 8
    assert data["B"]["oracle_pairs"][1] > data["B"]["oracle_pairs"][0] > 0
    assert (tmp_path / "theory.png").read_bytes()[:4] == b"\x89PNG"


def test_fixed_point_study_writes_each_problem_and_the_paired_difference(tmp_path):
    result = run_cli("theory", "--fixed-points", "2", "--seed", "3", "--vocab", "3", "--horizon", "2", "--prompts", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "fixed_points.json").read_text())
    assert [row["problem"] for row in data["problems"]] == [3, 4]
    gaps = [row["bilevel"]["gold"] - row["alternating"]["gold"] for row in data["problems"]]
    difference = data["bilevel_minus_alternating"]
    assert difference["gold"]["mean"] == pytest.approx(sum(gaps) / 2) and difference["problems"] == 2
    assert difference["gold"]["low"] < difference["gold"]["mean"] < difference["gold"]["high"]
    assert all(row[name]["shortfall"] > -1e-9 for row in data["problems"] for name in ("bilevel", "alternating", "reference"))
    assert "over 2 problems" in result.stdout and not (tmp_path / "theory.json").exists()


def test_train_into_a_log_file_shows_a_line_per_outer_step(tmp_path):
    """Under nohup, SLURM or a redirect stderr is a file, where a progress bar stays silent: one
    flushed line per outer step says how far the run is."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-debug.yaml"
    log = tmp_path / "train.log"
    args = ["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "run"), "--set", "train.tensorboard=false", "--set", "train.eval_every=2"]
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "rlhf_bilevel_cli.app", *args], stdout=out, stderr=out, cwd=tmp_path)
    text = log.read_text()
    assert done.returncode == 0, text
    clock = r"\d+:\d\d:\d\d"
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(lines) == 3, text
    evaluated = rf"step (\d)/3, labels (\d+), gold [-\d.e]+, agreement \d+%, elapsed {clock}, remaining {clock}"
    plain = rf"step (\d)/3, labels (\d+), elapsed {clock}, remaining {clock}"
    # train.eval_every=2: steps 2 and 3 (the last) are evaluated, step 1 is not
    matches = [re.fullmatch(plain, lines[0]), re.fullmatch(evaluated, lines[1]), re.fullmatch(evaluated, lines[2])]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == [1, 2, 3]
    assert [int(m[2]) for m in matches] == [12, 24, 36]  # labels: (K + 1)·B per outer step
    assert lines[2].endswith("remaining 0:00:00")
