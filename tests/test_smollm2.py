"""The embedded default model end to end: one short outer step of the default recipe, twice (slow: ~2 min)."""

import json
from pathlib import Path

import pytest
from peft import PeftModel

from rlhf_bilevel import environment
from rlhf_bilevel.commands.train import train
from rlhf_bilevel.lm.model import ModelConfig, load_base, resolve
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.types import LAMBDA

RECIPES = Path(__file__).parents[1] / "recipes"

pytestmark = pytest.mark.slow


SHORT = [
    "bilevel.outer_steps=1", "bilevel.inner_steps=1", "bilevel.pairs_per_step=2",
    "bilevel.trajectories_per_step=2", "bilevel.responses_per_prompt=2", "rollout.max_new_tokens=6", "train.eval_pairs=2",
]


def metrics_without_times(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_default_recipe_runs_one_outer_step_on_smollm2_and_repeats_it_exactly(tmp_path):
    recipe = load_recipe(RECIPES / "smollm2-sentiment.yaml", SHORT)
    first, second = tmp_path / "first", tmp_path / "second"
    with environment.threads(1):  # the recipe's train.threads decides, not the process's count
        summary = train(recipe, first, RECIPES)
    assert summary.oracle_pairs == 2 * 2 and summary.gold_reference is not None
    # the cached conversion is a plain model: no GGUF origin left to re-pack its weights on load
    config = json.loads((Path(resolve("smollm2")[0]) / "config.json").read_text())
    assert "quantization_config" not in config
    base, tokenizer = load_base(ModelConfig(name="smollm2"))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    PeftModel.from_pretrained(base, first / "checkpoint-000001" / "adapters" / LAMBDA)
    records = [json.loads(line) for line in (first / "preferences.jsonl").read_text().splitlines()]
    assert len(records) == summary.oracle_pairs and all(r["prompt"] for r in records)
    # a second seeded run, from a process set to another thread count, gives every number again
    with environment.threads(2):
        train(recipe, second, RECIPES)
    repeated = metrics_without_times(first)
    assert repeated == metrics_without_times(second) and len(repeated) == 3  # the reference's evaluation, one inner step, one outer step
