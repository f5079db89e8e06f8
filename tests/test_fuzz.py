"""Untrusted input: malformed recipes, overrides and prompt files, generated from a fixed seed, each
end in one `error:` line that names the field at fault, never in a traceback, and write nothing.

Most cases run the Typer app in this interpreter (the same parsing and error handling as the
installed command, without paying ~6 s of imports per case); a few run the real command in
a fresh interpreter, where a traceback would reach the user's terminal.
"""

import dataclasses
import http.server
import os
import random
import threading
import types
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import run_cli
from typer.testing import CliRunner

from rlhf_bilevel.lm import tiny
from rlhf_bilevel.recipe import Recipe
from rlhf_bilevel_cli.app import app

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "tiny-debug.yaml"
SEED = 8
PER_FIELD = 3  # malformations drawn per recipe field


def tiny_data() -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {key: str(RECIPES / path) for key, path in data["prompts"].items()}
    return data


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted path, type hint) of every scalar or list field of a recipe."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found += leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", hint))
    return found


def invalid_values(hint: typing.Any) -> list:
    """Values no field of this type accepts: the wrong kind, or out of range for every field of its kind."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    wrong_kinds = [[1, 2], {"a": 1}]
    if base is int:
        return [*wrong_kinds, "four", 2.5, True, -1, 10**30]
    if base is float:
        return [*wrong_kinds, "fast", True, 1e308, -1e308, float("nan"), float("inf"), 10**400]
    if base is bool:
        return [*wrong_kinds, "maybe", 1, 0.5]
    if base is str:
        return [*wrong_kinds, 3, 2.5, True]
    if typing.get_origin(base) is typing.Literal:
        return [*wrong_kinds, "no-such-choice", 7]
    if typing.get_origin(base) is tuple:
        return ["not a list", 3, [[1]], [{"a": 1}]]
    raise AssertionError(f"no malformations for {hint}")


def field_cases() -> list[tuple[str, str, typing.Any]]:
    rng = random.Random(SEED)
    cases = []
    for path, hint in leaf_fields(Recipe):
        pool = invalid_values(hint)
        for value in rng.sample(pool, min(PER_FIELD, len(pool))):
            cases.append((path, path, value))
    # values of the right kind that a field rejects by its own rule
    for path, value in [
        ("bilevel.sigma", 0), ("bilevel.gamma", 1.5), ("bilevel.beta", -0.1), ("bilevel.inner_steps", 0),
        ("bilevel.policy_step.lr", 0), ("bilevel.policy_step.weight_decay", -0.1), ("bilevel.reward_step.max_norm", -1.0), ("bilevel.critic.lr", -0.5),
        ("bilevel.critic.batch_size", 0), ("bilevel.critic.radius", 0.0), ("bilevel.critic.optimizer", "rmsprop"),
        ("bilevel.critic.replay_capacity", 0), ("adapters.r", 0), ("adapters.alpha", 0), ("adapters.dropout", 1.0),
        ("rollout.max_new_tokens", 0), ("rollout.max_prompt_tokens", 0), ("train.save_every", 0),
        ("train.keep", 0), ("train.max_bad_steps", 0), ("oracle.temperature", 0.0), ("prompts.limit", 0),
    ]:
        cases.append((path, path, value))
    cases += [("modle", "modle", {}), ("bilevel.sigmaa", "bilevel.sigmaa", 0.1), ("bilevel", "bilevel", [1]),
              ("train", "train", "fast"), ("oracle", "oracle", None)]
    return cases


def set_path(data: dict, path: str, value: typing.Any) -> dict:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def invoke(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    """The command in this interpreter: (exit code, stderr, run folder); an escaped exception fails the test."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *args, "--output-dir", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for {args}") from result.exception
    return result.exit_code, result.stderr, out


def assert_one_line_error(code: int, stderr: str, out: Path, names: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr
    assert names in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert not out.exists(), "a rejected run wrote files"


@pytest.mark.parametrize("path, names, value", field_cases(), ids=lambda v: str(v)[:40])
def test_malformed_recipe_field(tmp_path, path, names, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(set_path(tiny_data(), path, value)))
    assert_one_line_error(*invoke(tmp_path, "--recipe", str(recipe)), names)


@pytest.mark.parametrize(
    "override, names",
    [
        ("bilevel.outer_steps.x=1", "bilevel.outer_steps"),
        ("bilevel.sigma=[", "bilevel.sigma"),
        ("=3", "--set"),
        ("no-equals-sign", "--set"),
        ("prompts=3", "prompts"),
        ("bilevel.critic=null", "bilevel.critic"),
        ("train.seed=1e400", "train.seed"),
        ("bilevel.sigma=!!python/object/apply:os.system [ls]", "bilevel.sigma"),
    ],
)
def test_malformed_override(tmp_path, override, names):
    assert_one_line_error(*invoke(tmp_path, "--recipe", str(TINY), "--set", override), names)


def garbage(n: int) -> bytes:
    return random.Random(SEED).randbytes(n)


RECIPE_FILES = {
    "empty": b"",
    "binary-garbage": garbage(300),
    "not-utf8": b"model: {name: tiny}\n# caf\xe9\n",
    "utf16": "model: {name: tiny}\n".encode("utf-16"),
    "a-list": b"- model\n- prompts\n",
    "a-scalar": b"42\n",
    "bad-yaml": b"bilevel: {sigma: [\n",
    "tabs": b"bilevel:\n\tsigma: 1\n",
}


@pytest.mark.parametrize("name", RECIPE_FILES)
def test_malformed_recipe_file(tmp_path, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(RECIPE_FILES[name])
    code, stderr, out = invoke(tmp_path, "--recipe", str(recipe))
    names = "prompts" if name == "empty" else "--recipe"  # an empty recipe is valid YAML that lacks its prompts
    assert_one_line_error(code, stderr, out, names)


def parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


PROMPT_FILES = {
    "empty.jsonl": b"",
    "blank-lines.jsonl": b"\n\n\n",
    "garbage.jsonl": garbage(500),
    "not-utf8.jsonl": b'{"prompt": "caf\xe9"}\n',
    "no-prompt-column.jsonl": b'{"text": "hello"}\n',
    "number-prompt.jsonl": b'{"prompt": 3}\n',
    "null-prompt.jsonl": b'{"prompt": null}\n',
    "blank-prompt.jsonl": b'{"prompt": "   "}\n',
    "list-prompt.jsonl": b'{"prompt": ["a"]}\n',
    "not-objects.jsonl": b"[1, 2]\n3\n",
    "duplicate-key.jsonl": b'{"prompt": "a", "prompt": 3}\n',
    "truncated.json": b'[{"prompt": "a"',
    "scalar.json": b"3",
    "header-only.csv": b"prompt\n",
    "no-prompt-column.csv": b"a,b\n1,2\n",
    "not-utf8.csv": b"prompt\ncaf\xe9\n",
    "garbage.parquet": garbage(400),
    "empty.parquet": b"",
    "zero-rows.parquet": parquet(pa.table({"prompt": pa.array([], type=pa.string())})),
    "int-prompts.parquet": parquet(pa.table({"prompt": pa.array([1, 2])})),
    "bytes-prompts.parquet": parquet(pa.table({"prompt": pa.array([b"\xff"], type=pa.binary())})),
    "prompts.txt": b"hello\n",
}


@pytest.mark.parametrize("name", PROMPT_FILES)
@pytest.mark.parametrize("which", ["train", "eval"])
def test_malformed_prompt_file(tmp_path, name, which):
    prompts = tmp_path / name
    prompts.write_bytes(PROMPT_FILES[name])
    code, stderr, out = invoke(tmp_path, "--recipe", str(TINY), "--set", f"prompts.{which}={prompts}")
    assert_one_line_error(code, stderr, out, "prompts.field" if "no-prompt-column" in name else f"prompts.{which}")


def test_unreadable_files_are_one_line_errors(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    for name in ("recipe.yaml", "prompts.jsonl"):
        (tmp_path / name).write_text('{"prompt": "a"}\n')
        (tmp_path / name).chmod(0)
    assert_one_line_error(*invoke(tmp_path, "--recipe", str(tmp_path / "recipe.yaml")), "--recipe")
    assert_one_line_error(*invoke(tmp_path, "--recipe", str(TINY), "--set", f"prompts.train={tmp_path / 'prompts.jsonl'}"), "prompts.train")


def test_the_installed_command_prints_no_traceback(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(RECIPE_FILES["binary-garbage"])
    out = tmp_path / "run"
    result = run_cli("train", "--recipe", str(recipe), "--output-dir", str(out), cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, out, "--recipe")


def test_an_api_key_reaches_no_file_and_no_message(tmp_path, monkeypatch):
    """The key is read from the environment; an endpoint that echoes it back must not get it printed or saved."""
    key = "sk-test-" + garbage(12).hex()

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = f"bad request from {self.headers.get('Authorization')}".encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RLHF_BILEVEL_TEST_KEY", key)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    settings = ["oracle.kind=http", f"oracle.url={url}", "oracle.model=judge", "oracle.api_key_env=RLHF_BILEVEL_TEST_KEY",
                "oracle.retries=0", "oracle.backoff=0", "oracle.timeout=5"]
    out = tmp_path / "run"
    try:
        result = CliRunner().invoke(app, ["train", "--recipe", str(TINY), "--output-dir", str(out), *[a for s in settings for a in ("--set", s)]])
    finally:
        server.shutdown()
    assert result.exit_code == 2 and result.stderr.startswith("error: oracle:"), result.stderr
    assert key not in result.stdout + result.stderr
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "recipe.yaml" for path in written)
    assert not [path for path in written if key.encode() in path.read_bytes()]


def test_a_pickled_model_is_refused(tmp_path):
    """Weights load from safetensors only: a pytorch_model.bin is a pickle, which can run code as it loads."""
    model, tokenizer = tiny.build()
    folder = tmp_path / "pickled-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    code, stderr, out = invoke(tmp_path, "--recipe", str(TINY), "--model", str(folder))
    assert_one_line_error(code, stderr, out, "model.name")
    assert "model.safetensors" in stderr
