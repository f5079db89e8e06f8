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
    for key in ("phi_star", "gap_sq", "slope", "sigma", "B", "replay_bias", "oracle_pairs"):
        assert key in data
    assert set(data["gap_sq"]) == {"exact", "sampled", "alternating", "printed", "exact_replay", "exact_replay_steps", "sampled_replay"}
    assert len(data["gap_sq"]["exact"]) == 40 and len(data["gap_sq"]["sampled"]) == 8
    assert data["B"]["oracle_pairs"][1] > data["B"]["oracle_pairs"][0] > 0
    assert (tmp_path / "theory.png").read_bytes()[:4] == b"\x89PNG"
