import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_bilevel.config import ConfigError, build
from rlhf_bilevel.prompts import PromptConfig, load_prompts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_shipped_prompt_sets_load_and_are_disjoint():
    cfg = PromptConfig(train="data/prompts-train.jsonl", eval="data/prompts-eval.jsonl")
    train, held_out = load_prompts(cfg, RECIPES)
    assert len(train) >= 200 and len(held_out) >= 50
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    assert all(isinstance(p, str) and 10 < len(p) < 200 for p in train + held_out)


def test_every_local_format_reads_the_named_column_relative_to_base_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "one", "id": 1}, {"text": "two", "id": 2}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}, {"text": "four"}]), encoding="utf-8")
    (tmp_path / "c.csv").write_text("id,text\n1,five\n2,six\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["seven", "eight"]}), tmp_path / "d.parquet")
    for train, expected in [("data/a.jsonl", ["one", "two"]), ("b.json", ["three", "four"]), ("c.csv", ["five", "six"])]:
        assert load_prompts(PromptConfig(train=train, field="text"), tmp_path) == (expected, [])
    absolute = str(tmp_path / "d.parquet")  # outside base_dir: an absolute path is not joined to it
    cfg = PromptConfig(train="a.jsonl", eval=absolute, field="text")
    assert load_prompts(cfg, tmp_path / "data") == (["one", "two"], ["seven", "eight"])


def test_limit_keeps_the_first_prompts_of_each_set(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    cfg = PromptConfig(train="t.jsonl", eval="e.jsonl", limit=2)
    assert load_prompts(cfg, tmp_path) == (["p0", "p1"], ["q0", "q1"])
    with pytest.raises(ConfigError, match=r"^prompts\.limit: must be > 0, got 0$"):
        build(PromptConfig, {"train": "t.jsonl", "limit": 0}, "prompts")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, r"^prompts\.eval: no such file .*missing\.jsonl$"),
        ("prompts.txt", b"hello\n", r"^prompts\.eval: .*prompts\.txt: unsupported extension '\.txt'; use one of \.jsonl, \.json, \.parquet, \.csv$"),
        ("empty.jsonl", b"", r"^prompts\.eval: .*empty\.jsonl has no prompts"),
        ("blank_lines.jsonl", b"\n\n", r"^prompts\.eval: .*blank_lines\.jsonl has no prompts$"),
        ("header.csv", b"prompt\n", r"^prompts\.eval: .*header\.csv has no prompts$"),
        ("latin1.jsonl", '{"prompt": "café"}\n'.encode("latin-1"), r"^prompts\.eval: .*latin1\.jsonl is not valid UTF-8 \(byte 0xe9 at offset 15\)$"),
        ("broken.jsonl", b'{"prompt": "a"\n', r"^prompts\.eval: cannot read .*broken\.jsonl: JSON parse error"),
        ("broken.parquet", b"not parquet", r"^prompts\.eval: cannot read .*broken\.parquet: .*[Pp]arquet"),
        ("other.jsonl", b'{"text": "a", "id": 1}\n', r"^prompts\.field: no column 'prompt' in .*other\.jsonl; columns: text, id$"),
        ("number.jsonl", b'{"prompt": "a"}\n{"prompt": 3}\n', r"^prompts\.eval: row 1 of .*number\.jsonl: 'prompt' must be a non-blank string, got 3$"),
        ("blank.jsonl", b'{"prompt": "a"}\n{"prompt": "  "}\n', r"^prompts\.eval: row 1 of .*blank\.jsonl: 'prompt' must be a non-blank string, got '  '$"),
        ("null.jsonl", b'{"prompt": null}\n{"prompt": "a"}\n', r"^prompts\.eval: row 0 of .*null\.jsonl: 'prompt' must be a non-blank string, got None$"),
    ],
)
def test_bad_prompt_files_are_one_line_config_errors_naming_the_field(tmp_path, capfd, name, content, match):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "fine"}])
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=match) as caught:
        load_prompts(PromptConfig(train="train.jsonl", eval=name), tmp_path)
    assert "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""  # no log lines or progress bars from datasets around the error


def test_a_directory_is_not_a_prompt_file(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"^prompts\.train: .*data is a directory"):
        load_prompts(PromptConfig(train="./data"), tmp_path)


def test_loading_writes_no_cache_next_to_the_data(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a"}])
    load_prompts(PromptConfig(train="t.jsonl"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
