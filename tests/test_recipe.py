"""Recipes: every shipped one is valid, and every mistake is one line that names its key."""

from pathlib import Path

import pytest

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.recipe import Recipe, load_recipe, parse_recipe, recipe_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
PROMPTS = {"prompts": {"train": "data/prompts-train.jsonl"}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert parse_recipe(recipe_dict(recipe)) == recipe  # the resolved form a run saves reads back the same


def test_the_promised_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"smollm2-sentiment", "tiny-debug", "alternating-baseline"} <= names
    assert any("cluster" in name for name in names)


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({**PROMPTS, "bilevel": {"sigmaa": 1}}, [], r"^bilevel\.sigmaa: unknown key \(did you mean 'sigma'\?\)$"),
        ({**PROMPTS, "modle": {}}, [], r"^modle: unknown key \(did you mean 'model'\?\)$"),
        ({}, [], r"^prompts: required$"),
        ({"prompts": {"eval": "x.jsonl"}}, [], r"^prompts\.train: required$"),
        (PROMPTS, ["bilevel.sigma=abc"], r"^bilevel\.sigma: expected float, got 'abc'$"),
        (PROMPTS, ["model.dtype=float16"], r"^model\.dtype: must be one of auto, float32, bfloat16; got .float16."),
        (PROMPTS, ["train.save_every=0"], r"^train\.save_every: must be > 0"),
        (PROMPTS, ["oracle.temperature=-1"], r"^oracle\.temperature: must be > 0"),
    ],
)
def test_mistakes_name_their_key(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data, overrides)


def test_overrides_reach_any_field():
    recipe = parse_recipe(PROMPTS, ["bilevel.critic.kind=mc", "adapters.target_modules=[q_proj, v_proj]", "model.name=tiny"])
    assert recipe.bilevel.critic.kind == "mc"
    assert recipe.adapters.target_modules == ("q_proj", "v_proj")
    assert recipe.model.name == "tiny"


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^--recipe: no such file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("bilevel: {sigma: [\n")
    with pytest.raises(ConfigError, match=r"^--recipe: .*bad.yaml is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
