"""The recipe reference: generated from the dataclasses, committed, and true to what a recipe accepts."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.recipe import Recipe, parse_recipe
from rlhf_bilevel.recipe_reference import json_schema, markdown, options, schema_text, sections

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_committed_reference_matches_the_code():
    assert (ROOT / "docs" / "recipe.md").read_text(encoding="utf-8") == markdown(), "run python scripts/recipe_reference.py"
    assert (ROOT / "docs" / "recipe.schema.json").read_text(encoding="utf-8") == schema_text(), "run python scripts/recipe_reference.py"


def test_the_script_reports_drift(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "recipe_reference.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_field_is_listed_with_its_help():
    text = markdown()
    listed = options()
    assert len(listed) > 90 and len({(o.path, o.choice) for o in listed}) == len(listed)
    for option in listed:
        assert option.help.strip(), option.path
        assert f"| `{option.path}` |" in text and option.help.replace("|", "\\|") in text
    assert "`bilevel.reward_fit.steps`" in text and "`bilevel.critic.batch_size`" in text


def test_each_oracle_kind_has_its_own_table():
    """The fields every kind takes once, then each kind's own, under the `--set` that picks the kind."""
    text = markdown()
    from rlhf_bilevel.oracles.registry import kinds

    for kind in kinds():
        assert f"### `oracle` with `kind: {kind.name}`" in text, kind.name
    by_path = {}
    for option in options():
        by_path.setdefault(option.path, set()).add(option.choice)
    assert by_path["oracle.flip"] == {()} and by_path["oracle.kind"] == {()}
    assert by_path["oracle.url"] == {("oracle.kind=http",)}
    assert by_path["oracle.model"] == {("oracle.kind=llm-judge",), ("oracle.kind=reward-model",), ("oracle.kind=http",)}


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        documented: int = dataclasses.field(default=1, metadata={"help": "has it"})
        silent: int = 2

    with pytest.raises(TypeError, match=r"^Bare\.silent: no help text"):
        sections(Bare)


def test_every_listed_path_takes_its_default_through_set():
    """The reference's paths and defaults are what `--set` reaches and what a recipe resolves to."""
    data = {"prompts": {"train": "p.jsonl"}}
    for option in options():
        if option.default is dataclasses.MISSING:
            continue
        value = json.dumps(list(option.default) if isinstance(option.default, tuple) else option.default)
        base = parse_recipe(data, list(option.choice))  # an oracle kind's field, with that kind
        assert parse_recipe(data, [*option.choice, f"{option.path}={value}"]) == base, (option.path, option.choice)


def valid(schema: dict, value, path: str = "") -> list[str]:
    """The errors of `value` under the subset of JSON Schema that recipe.schema.json uses."""
    if "enum" in schema:
        return [] if any(value == choice and type(value) is type(choice) for choice in schema["enum"]) else [f"{path}: not in enum"]
    kinds = schema.get("type", [])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    checks = {
        "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list), "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    if kinds and not any(checks[kind](value) for kind in kinds):
        return [f"{path}: not {kinds}"]
    errors = []
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: does not match {schema['pattern']}")
    if "anyOf" in schema and all(valid(option, value, path) for option in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    for rule in schema.get("allOf", []):  # if/then rules
        if not valid(rule["if"], value, path):
            errors += valid(rule["then"], value, path)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            errors += [f"{path}.{key}: unknown" for key in value if key not in properties]
        errors += [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
        errors += [e for key, v in value.items() if key in properties for e in valid(properties[key], v, f"{path}.{key}")]
    if isinstance(value, list):
        errors += [e for i, v in enumerate(value) for e in valid(schema["items"], v, f"{path}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
            errors.append(f"{path}: out of range")
    return errors


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_the_schema_accepts_every_shipped_recipe(path):
    assert valid(json_schema(), yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize(
    "section, key, value",
    [("bilevel", "sigmaa", 0.1), ("bilevel", "inner_steps", "four"), ("model", "dtype", "float16"), ("train", "seed", -1),
     ("rollout", "autocast", "yes"), ("adapters", "target_modules", [1])],
)
def test_the_schema_and_the_loader_refuse_the_same_mistakes(section, key, value):
    data = {"prompts": {"train": "p.jsonl"}, section: {key: value}}
    assert valid(json_schema(), data)
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}"):
        parse_recipe(data)


@pytest.mark.parametrize(
    "oracle, refused",
    [({"temperature": 0.2}, False), ({"kind": "keyword", "keywords": ["thanks"]}, False), ({"kind": "python:m:f", "pairwise": True}, False),
     ({"kind": "http", "url": "http://x", "question": "Which?"}, False), ({"kind": "http", "temperature": 0.1}, True),
     ({"url": "http://x"}, True), ({"kind": "llm-judge", "keywords": []}, True), ({"kind": "no-such-oracle"}, True),
     ({"kind": "length", "target_words": "four"}, True)],
)
def test_the_schema_and_the_loader_agree_on_each_oracle_kinds_keys(oracle, refused):
    data = {"prompts": {"train": "p.jsonl"}, "oracle": oracle}
    assert bool(valid(json_schema(), data)) is refused
    if refused:
        with pytest.raises(ConfigError, match=r"^oracle\."):
            parse_recipe(data)
    else:
        parse_recipe(data)


def test_the_schema_knows_the_recipe_root():
    schema = json_schema()
    assert schema["required"] == ["prompts"] and set(schema["properties"]) == {f.name for f in dataclasses.fields(Recipe)}
    assert schema["properties"]["bilevel"]["properties"]["reward_fit"]["properties"]["steps"]["default"] == 1
