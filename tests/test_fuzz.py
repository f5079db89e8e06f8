"""Untrusted input: malformed recipes, overrides and prompt files, generated from a fixed seed, each
end in one `error:` line that names the field at fault, never in a traceback, and write nothing.
Every numeric and every path field of a recipe is fuzzed, found from the dataclasses (each oracle
kind's own fields with that kind set, as the recipe reference lists them), so a new field is fuzzed
as soon as it exists; those cases stop at `train --dry-run`, which loads no model.

Most cases run the Typer app in this interpreter (the same parsing and error handling as the
installed command, without paying ~6 s of imports per case); a few run the real command in
a fresh interpreter, where a traceback would reach the user's terminal.
"""

import http.server
import json
import math
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
from rlhf_bilevel.recipe_reference import options
from rlhf_bilevel_cli.app import app

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "tiny-debug.yaml"
SEED = 8
PER_FIELD = 3  # malformations drawn per recipe field


def tiny_data() -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {key: str(RECIPES / path) for key, path in data["prompts"].items()}
    return data


def leaf_fields() -> list[tuple[str, typing.Any, tuple[str, ...]]]:
    """(dotted path, type hint, the `--set`s that pick its variant) of every scalar or list field of a
    recipe, each oracle kind's own with that kind; a field several kinds inherit is fuzzed once."""
    found, seen = [], set()
    for option in options():
        if (option.path, option.help) not in seen:
            seen.add((option.path, option.help))
            found.append((option.path, option.hint, option.choice))
    return found


def with_choice(data: dict, choice: tuple[str, ...]) -> dict:
    """`data` with the variant `choice` picks: its section holds only the key that picks it (the file's
    other keys there are another variant's)."""
    for setting in choice:
        key, _, value = setting.partition("=")
        *section, leaf = key.split(".")
        set_path(data, ".".join(section), {leaf: yaml.safe_load(value)})
    return data


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
    for path, hint, choice in leaf_fields():
        pool = invalid_values(hint)
        for value in rng.sample(pool, min(PER_FIELD, len(pool))):
            cases.append((path, path, value, choice))
    # values of the right kind that a field rejects by its own rule
    for path, value in [
        ("bilevel.sigma", 0), ("bilevel.gamma", 1.5), ("bilevel.beta", -0.1), ("bilevel.inner_steps", 0),
        ("bilevel.policy_step.lr", 0), ("bilevel.policy_step.weight_decay", -0.1), ("bilevel.reward_step.max_norm", -1.0), ("bilevel.critic.lr", -0.5),
        ("bilevel.critic.batch_size", 0), ("bilevel.critic.radius", 0.0), ("bilevel.critic.optimizer", "rmsprop"),
        ("bilevel.critic.replay_capacity", 0), ("adapters.r", 0), ("adapters.alpha", 0), ("adapters.dropout", 1.0),
        ("rollout.max_new_tokens", 0), ("rollout.max_prompt_tokens", 0), ("train.save_every", 0),
        ("train.keep", 0), ("train.max_bad_steps", 0), ("oracle.temperature", 0.0), ("prompts.limit", 0), ("oracle.flip", 0.5),
    ]:
        cases.append((path, path, value, ()))
    cases += [("oracle.batch_size", "oracle.batch_size", 0, ("oracle.kind=http",)), ("oracle.timeout", "oracle.timeout", 0.0, ("oracle.kind=http",)),
              ("oracle.url", "oracle.url", "http://x", ())]  # a key of another kind
    cases += [("modle", "modle", {}, ()), ("bilevel.sigmaa", "bilevel.sigmaa", 0.1, ()), ("bilevel", "bilevel", [1], ()),
              ("train", "train", "fast", ()), ("oracle", "oracle", None, ())]
    return cases


def set_path(data: dict, path: str, value: typing.Any) -> dict:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def invoke(tmp_path: Path, *args: str, out: Path | None = None) -> tuple[int, str, Path]:
    """The command in this interpreter: (exit code, stderr, run folder); an escaped exception fails the test."""
    out = out or tmp_path / "run"
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


@pytest.mark.parametrize("path, names, value, choice", field_cases(), ids=lambda v: str(v)[:40])
def test_malformed_recipe_field(tmp_path, path, names, value, choice):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(set_path(with_choice(tiny_data(), choice), path, value)))
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


NUMERIC = {
    int: [0, -1, 10**15, 2**63, math.nan, math.inf, "seven", [1]],
    float: [0, -1.0, 1e30, 1e300, math.nan, math.inf, -math.inf, "fast", [1.0]],
}


def base_type(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def yaml_text(value: typing.Any) -> str:
    """`value` as `--set` reads it (YAML): .nan and .inf for the floats JSON cannot write."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return json.dumps(value)


def assert_checked(code: int, stderr: str, out: Path, field: str) -> None:
    """A value a field allows passes every check (exit 0); any other ends in one line naming the field."""
    if code == 0:
        assert "error" not in stderr and "Traceback" not in stderr, stderr
        assert not out.exists(), "a dry run wrote files"
    else:
        assert_one_line_error(code, stderr, out, field)


def numeric_cases() -> list[tuple[str, typing.Any, tuple[str, ...]]]:
    return [
        (path, value, choice) for path, hint, choice in leaf_fields() if base_type(hint) in NUMERIC for value in NUMERIC[base_type(hint)]
    ]


def test_every_numeric_field_is_fuzzed():
    fuzzed = {(path, choice) for path, _, choice in numeric_cases()}
    paths = {path for path, _ in fuzzed}
    assert {"bilevel.reward_fit.steps", "rollout.max_new_tokens", "bilevel.critic.replay_capacity", "train.eval_pairs", "oracle.flip"} <= paths
    # each oracle kind's own fields, with that kind
    assert {("oracle.timeout", ("oracle.kind=http",)), ("oracle.batch_size", ("oracle.kind=llm-judge",)),
            ("oracle.target_words", ("oracle.kind=length",))} <= fuzzed
    assert len(fuzzed) > 40


@pytest.mark.parametrize("path, value, choice", numeric_cases(), ids=lambda v: str(v)[:40])
def test_numeric_field(tmp_path, path, value, choice):
    picked = [a for setting in choice for a in ("--set", setting)]
    code, stderr, out = invoke(tmp_path, "--recipe", str(TINY), *picked, "--set", f"{path}={yaml_text(value)}", "--dry-run")
    assert_checked(code, stderr, out, path)
    if refused_by_every_field(value):
        assert code == 2, f"{path}={value!r} passed"


def refused_by_every_field(value: typing.Any) -> bool:
    """The wrong kind, a negative int, or a number beyond int64 or float32: no field takes it."""
    if isinstance(value, (str, list)) or (type(value) is int and not 0 <= value < 2**63):
        return True
    return isinstance(value, float) and not abs(value) < 1e39


def path_fields() -> list[tuple[str, tuple[str, ...]]]:
    """(dotted path, the `--set`s that pick its variant) of every field that names a file or folder."""
    return [(option.path, option.choice) for option in options() if option.path_like]


def hostile_paths(tmp_path: Path) -> dict[str, Path]:
    """Paths no field can use: missing, a folder, garbage in a file of each kind a field reads, a
    special file (open() succeeds, and it reads as nothing, even for root)."""
    (tmp_path / "a-folder.jsonl").mkdir()
    for suffix in ("jsonl", "gguf", "parquet", "yaml"):
        (tmp_path / f"binary.{suffix}").write_bytes(garbage(700))
    (tmp_path / "special.jsonl").symlink_to("/proc/self/mem")
    return {
        "missing": tmp_path / "missing" / "prompts.jsonl",
        "a-folder": tmp_path / "a-folder.jsonl",
        "binary-jsonl": tmp_path / "binary.jsonl",
        "binary-gguf": tmp_path / "binary.gguf",
        "binary-parquet": tmp_path / "binary.parquet",
        "special-file": tmp_path / "special.jsonl",
    }


def test_the_path_fields_are_found():
    found = set(path_fields())
    assert {("prompts.train", ()), ("prompts.eval", ()), ("model.name", ())} <= found
    assert {("oracle.model", ("oracle.kind=reward-model",)), ("oracle.model", ("oracle.kind=llm-judge",))} <= found


def path_cases() -> list[tuple[str, str, tuple[str, ...]]]:
    cases = ["missing", "a-folder", "binary-jsonl", "binary-gguf", "binary-parquet", "special-file"]
    return [(path, case, choice) for path, choice in path_fields() for case in cases]


@pytest.mark.parametrize("path, case, settings", path_cases(), ids=lambda v: str(v))
def test_path_field(tmp_path, path, case, settings):
    target = hostile_paths(tmp_path)[case]
    extra = [a for setting in settings for a in ("--set", setting)]
    code, stderr, out = invoke(tmp_path, "--recipe", str(TINY), "--set", f"{path}={target}", *extra, "--dry-run")
    assert_one_line_error(code, stderr, out, path)


@pytest.mark.parametrize("case", ["missing", "a-folder", "binary-yaml", "special-file"])
def test_recipe_path(tmp_path, case):
    paths = {**hostile_paths(tmp_path), "binary-yaml": tmp_path / "binary.yaml"}
    assert_one_line_error(*invoke(tmp_path, "--recipe", str(paths[case]), "--dry-run"), "--recipe")


OUTPUT_DIRS = {
    "proc": lambda tmp: Path("/proc/x"),
    "a-file": lambda tmp: tmp / "file",
    "under-a-file": lambda tmp: tmp / "file" / "run",
    "name-too-long": lambda tmp: tmp / ("x" * 300),
    "holds-a-run": lambda tmp: tmp / "done",
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
@pytest.mark.parametrize("case", OUTPUT_DIRS)
def test_output_dir(tmp_path, case, dry_run):
    """Refused before the model loads: the real command, not only the dry run, writes nothing."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "recipe.yaml").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    code, stderr, _ = invoke(tmp_path, "--recipe", str(TINY), *(["--dry-run"] if dry_run else []), out=OUTPUT_DIRS[case](tmp_path))
    assert_one_line_error(code, stderr, tmp_path / "nothing", "--output-dir")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_read_only_output_dir_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes in any folder")
    tmp_path.chmod(0o500)
    try:
        assert_one_line_error(*invoke(tmp_path, "--recipe", str(TINY)), "--output-dir")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_a_rollout_beyond_the_context_is_refused_before_the_model_loads(tmp_path, dry_run):
    code, stderr, out = invoke(tmp_path, "--recipe", str(TINY), "--set", "rollout.max_new_tokens=100000000", *(["--dry-run"] if dry_run else []))
    assert_one_line_error(code, stderr, out, "rollout.max_new_tokens")
    assert "set rollout.max_new_tokens ≤ 256" in stderr


def test_a_dry_run_reports_the_estimate_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(app, ["train", "--recipe", str(TINY), "--output-dir", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "ready to run" in result.stdout and "estimated memory" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["compare", "--quick"], ["eval", "--run", "RUN"]], ids=["compare", "eval"])
@pytest.mark.parametrize("case", ["proc", "a-file", "under-a-file"])
def test_other_commands_refuse_an_unusable_out_folder(tmp_path, command, case):
    (tmp_path / "file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    args = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    result = CliRunner().invoke(app, [*args, "--recipe", str(TINY), "--out", str(OUTPUT_DIRS[case](tmp_path))] if command[0] == "compare"
                                else [*args, "--out", str(OUTPUT_DIRS[case](tmp_path))])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for {args}") from result.exception
    assert_one_line_error(result.exit_code, result.stderr, tmp_path / "nothing", "--out")
    assert sorted(tmp_path.rglob("*")) == before
