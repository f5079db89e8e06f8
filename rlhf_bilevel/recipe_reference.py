"""The recipe reference, generated from the dataclasses of a `Recipe`: every field's dotted path,
type, default, allowed values and help (`docs/recipe.md`), and a JSON Schema of a recipe
(`docs/recipe.schema.json`) that YAML editors use to complete and check a recipe.

The help text lives beside each field, in `field(metadata={"help": ...})`, with `"path": True` on a
field that names a file or folder; nothing here repeats them. A section read as one of several
classes (`config.Variants`, the oracle by its `kind`) is listed as the fields every variant takes,
then one table per variant of the fields of its own; its schema checks each variant's keys.
`scripts/recipe_reference.py` writes both files, and a test fails when they drift from the code.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import re

from rlhf_bilevel.config import FLOAT_MAX, INT_MAX, Variant, Variants
from rlhf_bilevel.recipe import Recipe

INT_RANGE = "a whole number, 0 to 2**63 − 1"
FLOAT_RANGE = f"a finite number of size at most {FLOAT_MAX:.4g} (float32)"


@dataclass(frozen=True)
class Option:
    """One leaf field of a recipe."""

    path: str  # dotted, as `--set` takes it: bilevel.reward_fit.steps
    hint: Any
    default: Any  # dataclasses.MISSING when the field is required
    help: str
    path_like: bool  # names a file or folder (or, where the help says so, a hub id)
    choice: tuple[str, ...] = ()  # the `--set` that picks its variant first, e.g. ("oracle.kind=http",); none for every variant


@dataclass(frozen=True)
class Section:
    """A dataclass of the recipe: its dotted path, its help and its leaf fields."""

    path: str
    help: str
    options: list[Option]
    variant: str = ""  # for one variant of a Variants section: what picks it, e.g. "kind: http"


def sections(
    cls: type = Recipe, path: str = "", help: str = "", base: Any = None, choice: tuple[str, ...] = (), shared: frozenset = frozenset()
) -> list[Section]:
    """Every section of `cls`, depth first, each with its own leaf fields; `base` is the section's
    default in its parent, whose values are the defaults a recipe gets (`bilevel.policy_step`'s Adam).
    `choice` and `shared`: for one variant, the `--set` that picks it and the fields listed for every variant."""
    hints = typing.get_type_hints(cls)
    own, nested = [], []
    for f in dataclasses.fields(cls):
        if f.name in shared:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: no help text; declare it as field(..., metadata={{'help': ...}})")
        default = default_of(f) if base is None else getattr(base, f.name)
        inner = default if dataclasses.is_dataclass(default) else None
        if dataclasses.is_dataclass(hints[f.name]) and issubclass(hints[f.name], Variants) and hints[f.name].variants():
            nested += variant_sections(hints[f.name], where, f.metadata["help"], inner)
        elif dataclasses.is_dataclass(hints[f.name]):
            nested += sections(hints[f.name], where, f.metadata["help"], inner, choice)
        else:
            own.append(Option(where, hints[f.name], default, f.metadata["help"], f.metadata.get("path", False), choice))
    variant = " ".join(choice)
    return ([Section(path, help, own, variant)] if own or choice else []) + nested


def variant_sections(cls: type, path: str, help: str, base: Any) -> list[Section]:
    """The fields every variant of `cls` takes, then each variant's own; `base`, the section's default,
    gives the defaults of the variant it is."""
    shared = frozenset(f.name for f in dataclasses.fields(cls))
    found = sections(cls, path, help, base)
    for variant in cls.variants():
        own_base = base if type(base) is variant.cls else None
        found += sections(variant.cls, path, "", own_base, (f"{path}.{cls.key}={variant.name}",), shared)
    return found


def options(cls: type = Recipe) -> list[Option]:
    """Every leaf field of a recipe, in the order the reference lists them."""
    return [option for section in sections(cls) for option in section.options]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(hint))
    return hint, False


def yaml_value(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def type_name(hint: Any) -> str:
    base, optional = split_optional(hint)
    if typing.get_origin(base) is Literal:
        name = "choice"
    elif typing.get_origin(base) is tuple:
        name = f"list of {typing.get_args(base)[0].__name__}"
    else:
        name = base.__name__
    return f"{name} or null" if optional else name


def allowed(hint: Any, path_like: bool = False) -> str:
    base, optional = split_optional(hint)
    if path_like:
        return "a path or a name \\| null" if optional else "a path or a name"
    if typing.get_origin(base) is Literal:
        text = " \\| ".join(yaml_value(choice) for choice in typing.get_args(base))
    else:
        text = {bool: "true \\| false", int: INT_RANGE, float: FLOAT_RANGE, str: "text"}.get(base, "a list of text")
    return f"{text} \\| null" if optional else text


def markdown() -> str:
    """docs/recipe.md."""
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by scripts/recipe_reference.py from the dataclasses of rlhf_bilevel; do not edit by hand. -->",
        "",
        "A recipe is one YAML file of the sections below; every field but `prompts.train` has a default.",
        "Any field can be changed from the command line with `--set PATH=VALUE`, e.g. `--set bilevel.reward_fit.steps=4`.",
        "Relative paths in a recipe are read from the recipe's own folder.",
        "",
        "Every int is a count, a size or a seed (0 to 2**63 − 1) and every float is finite within float32's range;",
        "the help says where a field asks for more (`> 0`, `in (0, 1]`). A run also checks, before it allocates",
        "anything, that `rollout.max_prompt_tokens + rollout.max_new_tokens` fits the model's context and that",
        "the run's estimated memory fits the machine (README, \"Hostile input\").",
        "",
        "Editors complete and check a recipe against [recipe.schema.json](recipe.schema.json): with the YAML",
        "language server (VS Code's YAML extension, neovim, …) put this line at the top of the recipe:",
        "",
        "    # yaml-language-server: $schema=../docs/recipe.schema.json",
        "",
    ]
    for section in sections():
        if section.variant:
            key, _, name = section.variant.partition("=")
            lines += [f"### `{section.path}` with `{key.rpartition('.')[2]}: {name}`", ""]
            if not section.options:
                lines += ["No fields of its own.", ""]
                continue
        else:
            lines += [f"## `{section.path}`", ""]
        if section.help:
            lines += [section.help[0].upper() + section.help[1:] + ".", ""]
        lines += ["| field | type | default | allowed | help |", "|---|---|---|---|---|"]
        for option in section.options:
            default = "required" if option.default is dataclasses.MISSING else f"`{yaml_value(option.default)}`"
            cells = [f"`{option.path}`", type_name(option.hint), default, allowed(option.hint, option.path_like), option.help.replace("|", "\\|")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def field_schema(hint: Any, help: str, default: Any) -> dict[str, Any]:
    base, optional = split_optional(hint)
    if dataclasses.is_dataclass(base) and issubclass(base, Variants) and base.variants():
        schema = variants_schema(base, default if dataclasses.is_dataclass(default) else None)
    elif dataclasses.is_dataclass(base):
        schema = object_schema(base, default if dataclasses.is_dataclass(default) else None)
    elif typing.get_origin(base) is Literal:
        schema = {"enum": [*typing.get_args(base), *([None] if optional else [])]}
    elif typing.get_origin(base) is tuple:
        schema = {"type": "array", "items": {"type": "string"}}
    elif base is int:
        schema = {"type": "integer", "minimum": 0, "maximum": INT_MAX}
    elif base is float:
        schema = {"type": "number", "minimum": -FLOAT_MAX, "maximum": FLOAT_MAX}
    else:
        schema = {"type": {bool: "boolean", str: "string"}[base]}
    if optional and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    schema["description"] = help
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        schema["default"] = list(default) if isinstance(default, tuple) else default
    return schema


def object_schema(cls: type, base: Any = None) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    defaults = {f.name: default_of(f) if base is None else getattr(base, f.name) for f in fields}
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.name: field_schema(hints[f.name], f.metadata["help"], defaults[f.name]) for f in fields},
    }
    required = [f.name for f in fields if default_of(f) is dataclasses.MISSING]
    if required:
        schema["required"] = required
    return schema


def variants_schema(cls: type, base: Any = None) -> dict[str, Any]:
    """A Variants section: any variant's keys are known, `cls.key` must pick a variant, and each
    variant (`if` its key matches `then`) takes its own keys alone. `base` is the section's default."""
    default_name = default_of(next(f for f in dataclasses.fields(cls) if f.name == cls.key))
    properties: dict[str, Any] = {}
    rules = []
    for variant in cls.variants():
        own = object_schema(variant.cls, base if type(base) is variant.cls else None)
        for name, schema in own["properties"].items():
            properties.setdefault(name, schema)
        picked: dict[str, Any] = {"type": "object", "properties": {cls.key: {"type": "string", "pattern": variant.pattern}}}
        if not re.search(variant.pattern, default_name):  # the default variant is also picked by leaving the key out
            picked["required"] = [cls.key]
        rules.append({"if": picked, "then": own})
    properties[cls.key] = {**properties[cls.key], "anyOf": [{"pattern": variant.pattern} for variant in cls.variants()]}
    return {"type": "object", "properties": properties, "allOf": rules}


def json_schema() -> dict[str, Any]:
    """docs/recipe.schema.json: a JSON Schema (draft 2020-12) of a recipe."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rlhf-bilevel recipe",
        "description": "A training recipe of rlhf-bilevel (docs/recipe.md).",
        **object_schema(Recipe),
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
