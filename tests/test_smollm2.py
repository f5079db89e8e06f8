"""The embedded default model end to end: one short outer step of the default recipe (slow: ~1 min)."""

import json
from pathlib import Path

import pytest
from peft import PeftModel

from rlhf_bilevel import environment
from rlhf_bilevel.lm.model import ModelConfig, load_base, resolve
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.train import train
from rlhf_bilevel.types import LAMBDA

RECIPES = Path(__file__).parents[1] / "recipes"

pytestmark = pytest.mark.slow


SHORT = [
    "bilevel.outer_steps=1", "bilevel.inner_steps=1", "bilevel.pairs_per_step=2",
    "bilevel.trajectories_per_step=2", "rollout.max_new_tokens=6", "train.eval_pairs=2",
]


def test_default_recipe_runs_one_outer_step_on_smollm2(tmp_path):
    recipe = load_recipe(RECIPES / "smollm2-sentiment.yaml", SHORT)
    summary = train(recipe, tmp_path, RECIPES)
    assert summary.oracle_pairs == 2 * 2 and summary.gold_reference is not None
    # the cached conversion is a plain model: no GGUF origin left to re-pack its weights on load
    config = json.loads((Path(resolve("smollm2")[0]) / "config.json").read_text())
    assert "quantization_config" not in config
    base, tokenizer = load_base(ModelConfig(name="smollm2"))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    PeftModel.from_pretrained(base, tmp_path / "checkpoint-000001" / "adapters" / LAMBDA)
    records = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert len(records) == summary.oracle_pairs and all(r["prompt"] for r in records)


def test_two_seeded_runs_give_the_same_metrics_whatever_the_process_threads(tmp_path):
    recipe = load_recipe(RECIPES / "smollm2-sentiment.yaml", SHORT)
    for name, threads in (("first", 1), ("second", 2)):
        with environment.threads(threads):  # the recipe's train.threads decides, not the process's count
            train(recipe, tmp_path / name, RECIPES)
    first, second = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("first", "second"))
    without_times = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in records] for records in (first, second)]
    assert without_times[0] == without_times[1] and len(first) == 3  # the reference's evaluation, one inner step, one outer step
