"""The run folder: whole-or-nothing writes, run.json's content, and one-line errors for a damaged folder."""

import json
import os
from pathlib import Path

import pytest

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.run_folder import RECIPE_FILE, RUN_FILE, RunFolder, run_record, write_atomic

TINY = Path(__file__).parents[1] / "recipes" / "tiny-debug.yaml"


def test_a_write_killed_before_its_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_atomic(path, "old")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    monkeypatch.undo()
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # the temporary file was renamed over it


def test_run_json_says_where_the_recipe_was_read_and_each_process_share(tmp_path):
    recipe = load_recipe(TINY, ["bilevel.pairs_per_step=8", "train.eval_pairs=4"])
    record = run_record(recipe, tmp_path, world_size=2)
    assert record["base_dir"] == str(tmp_path.resolve()) and record["world_size"] == 2
    assert record["per_process"] == {"trajectories_per_step": 2, "pairs_per_step": 4, "eval_pairs": 2}
    folder = RunFolder(tmp_path / "run")
    folder.write_start(recipe, record)
    assert json.loads((folder.path / RUN_FILE).read_text()) == record
    assert folder.base_dir("--resume") == tmp_path.resolve()
    assert folder.read_recipe("--resume", ["bilevel.sigma=0.5"]).bilevel.sigma == 0.5
    with pytest.raises(ConfigError, match="already holds a run"):
        folder.check_new()


def test_a_damaged_or_empty_folder_is_a_one_line_error(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(ConfigError, match=f"--run: {tmp_path} holds no run \\({RECIPE_FILE} missing\\)"):
        folder.read_recipe("--run")
    (tmp_path / RUN_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="--resume: .*run.json is damaged"):
        folder.base_dir("--resume")
    assert folder.latest_checkpoint() is None
