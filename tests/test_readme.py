"""The README as a user reads it: its Python examples run, its commands and options exist, its
links lead to files of the repository, and its headline figures are the ones docs/results.md records.

A block the README marks `<!-- test: python -->` is run as a script from a fresh folder holding a
copy of `recipes/`; one marked `<!-- test: file NAME -->` is written there as NAME first.
"""

import re
import runpy
import shutil
from pathlib import Path

import typer

from rlhf_bilevel.oracles.registry import make_oracle, oracle_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARKED_BLOCK = re.compile(r"<!-- test: (python|file (\S+)) -->\n```\w*\n(.*?)\n```", re.DOTALL)


def marked_blocks() -> tuple[list[str], dict[str, str]]:
    """(the Python examples, {file name: contents}) the README marks for testing."""
    scripts, files = [], {}
    for match in MARKED_BLOCK.finditer(README):
        if match.group(2):
            files[match.group(2)] = match.group(3) + "\n"
        else:
            scripts.append(match.group(3) + "\n")
    return scripts, files


def test_the_readme_marks_its_examples():
    scripts, files = marked_blocks()
    # a marker whose block no longer parses would silently leave an example untested
    assert len(scripts) + len(files) == README.count("<!-- test:")
    assert scripts and "my_oracles.py" in files


def test_python_examples_run(tmp_path, monkeypatch, capsys, one_thread):
    # in this process, as a user's script would run them, without paying the imports again
    scripts, files = marked_blocks()
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for i, text in enumerate(scripts):
        script = tmp_path / f"readme_example_{i}.py"
        script.write_text(text, encoding="utf-8")
        runpy.run_path(str(script), run_name="__main__")
    # the example trains a run, reads its metrics and evaluates it, as its comments say
    run = tmp_path / "runs" / "api-example"
    assert (run / "metrics.jsonl").is_file() and (run / "eval" / "eval.json").is_file()
    printed = capsys.readouterr().out
    assert "labels:" in printed and "win rate vs reference" in printed


def test_oracle_example_is_the_one_the_command_names(tmp_path, monkeypatch):
    _, files = marked_blocks()
    (tmp_path / "my_oracles.py").write_text(files["my_oracles.py"], encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    kind = re.search(r"oracle\.kind=(python:my_oracles:\w+)", README).group(1)
    oracle = make_oracle(oracle_config(kind=kind, labels="deterministic"))
    assert oracle.score(["p", "p"], ["Great!!", "fine"]).tolist() == [2.0, 0.0]
    assert oracle.compare(["p", "p"], ["Great!", "fine"], ["fine", "fine!"]).tolist() == [1.0, 0.0]


def commands_in_code() -> list[tuple[str, list[str]]]:
    """(subcommand, options) of every `rlhf-bilevel …` in the README's indented code and inline code."""
    indented = "\n".join(re.findall(r"\n    (.*)", README)).replace("\\\n", " ")  # continuation lines joined
    code = "\n".join([indented, *re.findall(r"`([^`\n]+)`", README)])
    found = []
    for line in code.splitlines():
        match = re.search(r"(?:rlhf-bilevel|rlhf_bilevel_cli\.app) (\w+)(.*)", line)
        if match:
            found.append((match.group(1), re.findall(r"(?<![\w-])--[a-z][a-z-]*", match.group(2))))
    return found


def test_every_command_and_option_the_readme_shows_exists():
    from rlhf_bilevel_cli.app import app

    cli = typer.main.get_command(app)
    found = commands_in_code()
    assert {name for name, _ in found} == {"train", "eval", "compare", "merge", "theory"}
    for name, options in found:
        assert name in cli.commands, name
        known = {opt for param in cli.commands[name].params for opt in param.opts}
        assert set(options) <= known, (name, set(options) - known)


def test_every_link_leads_to_a_file_of_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing


def test_the_headline_quotes_docs_results():
    headline = re.search(r"<!-- headline: .*? -->\n(.*?)<!-- headline: end -->", README, re.DOTALL).group(1)
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    figures = re.findall(r"-?\d+\.\d+", headline.split("|", 1)[1])
    assert len(figures) >= 18  # two methods, three measures, a mean and two bounds each
    assert [f for f in figures if f not in results] == []
    commit = re.search(r"commit ([0-9a-f]{7})", headline).group(1)
    assert f"Measured at {commit}" in results
    command = re.search(r"\n    (OMP_NUM_THREADS=1 rlhf-bilevel compare .*?)\n\n", headline, re.DOTALL).group(1)
    assert command in results

