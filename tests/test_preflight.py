"""The checks before a run: the output folder, the model's context and the memory estimate,
each a one-line ConfigError that names the field, with nothing written and no model loaded."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from rlhf_bilevel import preflight as pf
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm.model import ModelConfig, Shape, gguf_shape, model_shape
from rlhf_bilevel.recipe import parse_recipe

CPU = torch.device("cpu")
TINY = {"prompts": {"train": "p.jsonl"}, "model": {"name": "tiny"}}


def tiny_recipe(*overrides: str):
    return parse_recipe(TINY, list(overrides))


def test_a_writable_folder_passes_and_the_probe_leaves_nothing(tmp_path):
    pf.check_output_dir(tmp_path / "new" / "run", "--output-dir")
    pf.check_output_dir(tmp_path, "--output-dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda tmp: Path("/proc/x"), r"^--output-dir: cannot write in /proc \("),
        (lambda tmp: tmp / "file", r"^--output-dir: .*file is a file, not a folder"),
        (lambda tmp: tmp / "file" / "run", r"^--output-dir: .*file is a file, not a folder"),
        (lambda tmp: tmp / ("x" * 300), r"^--output-dir: cannot write in .*\(File name too long\)"),
    ],
    ids=["proc", "a-file", "under-a-file", "name-too-long"],
)
def test_an_unusable_folder_is_refused(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=message):
        pf.check_output_dir(where(tmp_path), "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes in any folder")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"^--resume: cannot write in .*Permission denied"):
            pf.check_output_dir(tmp_path / "run", "--resume")
    finally:
        tmp_path.chmod(0o700)


def test_the_context_bounds_prompt_and_response():
    shape = model_shape(ModelConfig(name="tiny"))
    assert shape.context == 512
    pf.check_context(tiny_recipe("rollout.max_prompt_tokens=256", "rollout.max_new_tokens=256"), shape)
    with pytest.raises(ConfigError, match=r"^rollout\.max_new_tokens: 256 prompt tokens and 257 new ones exceed the 512 positions of tiny; set rollout\.max_new_tokens ≤ 256"):
        pf.check_context(tiny_recipe("rollout.max_new_tokens=257"), shape)
    with pytest.raises(ConfigError, match=r"^rollout\.max_prompt_tokens: .*set rollout\.max_prompt_tokens < 512$"):
        pf.check_context(tiny_recipe("rollout.max_prompt_tokens=512"), shape)


def test_a_reward_layer_beyond_the_model_is_refused():
    shape = model_shape(ModelConfig(name="tiny"))
    pf.check_reward_layer(tiny_recipe("reward.layer=2"), shape)
    with pytest.raises(ConfigError, match=r"^reward\.layer: tiny has layers 0 \(the embeddings\) to 2; got 3$"):
        pf.check_reward_layer(tiny_recipe("reward.layer=3"), shape)


def test_the_estimate_follows_its_formula():
    """Each term as the module's docstring writes it, on a made-up shape."""
    shape = Shape(context=1024, hidden=8, layers=3, vocab=100, intermediate=16, tied=True)
    recipe = tiny_recipe(
        "rollout.max_prompt_tokens=10", "rollout.max_new_tokens=5", "bilevel.trajectories_per_step=6", "bilevel.pairs_per_step=2",
        "train.eval_pairs=4", "bilevel.inner_steps=2", "bilevel.outer_steps=7", "adapters.r=2", "reward.heads=3", "reward.hidden=4",
        "bilevel.critic.replay_capacity=50", "bilevel.critic.batch_size=9",
    )
    terms = {term.what: term for term in pf.estimate(recipe, shape, CPU)}
    d, L, V, W, H, T, R, state = 8, 3, 100, 16, 5, 15, 8, 6 * 2 * 8 * 4  # R = max(n=6, B·c=4, 2E=8)
    assert terms["base model"].bytes == (V * d + L * (4 * d * d + 3 * d * W)) * 4
    assert terms["adapters"].bytes == 3 * 2 * L * (11 * d + 3 * W) * 4 * 4
    assert terms["sampling"].bytes == R * (T * 2 * L * d * 4 + V * 4 + state) and terms["sampling"].field == "train.eval_pairs"
    assert terms["log π backward"].bytes == 6 * (T * L * (6 * d + 2 * W) * 4 + H * V * 4 * 2)
    assert terms["log π backward"].field == "bilevel.trajectories_per_step"
    assert terms["outer step"].bytes == 3 * 6 * state
    assert terms["preference store"].bytes == 7 * 3 * 2 * 2 * state and terms["preference store"].field == "bilevel.outer_steps"
    assert terms["critic replay"].bytes == 50 * 2 * d * 4 and terms["critic batch"].bytes == 9 * V * 4 * 3
    assert terms["reward heads"].bytes == 3 * 4 * (d + R * (H + 1)) * 4
    micro = {t.what: t for t in pf.estimate(parse_recipe(TINY, ["bilevel.micro_batch=2", "rollout.gradient_checkpointing=true"]), shape, CPU)}
    assert micro["log π backward"].field == "bilevel.micro_batch"
    assert micro["log π backward"].bytes == 2 * (288 * L * d * 4 + 32 * V * 4 * 2)
    # the judge's words are read by a float32 copy of a base that is not float32
    def judged(*override):
        return {t.what: t.bytes for t in pf.estimate(tiny_recipe("reward.judge={question: ok, words: true}", *override), shape, CPU)}
    assert judged("model.dtype=bfloat16")["judge's words"] == terms["base model"].bytes
    assert "judge's words" not in judged("model.dtype=float32", "rollout.autocast=true") and "judge's words" not in terms


@pytest.mark.parametrize(
    "override, field",
    [
        ("bilevel.trajectories_per_step=10000000000", "bilevel.trajectories_per_step"),
        ("bilevel.pairs_per_step=10000000000", "bilevel.pairs_per_step"),
        ("train.eval_pairs=10000000000", "train.eval_pairs"),
        ("bilevel.inner_steps=10000000000000", "bilevel.inner_steps"),
        ("bilevel.outer_steps=10000000000000", "bilevel.outer_steps"),
        ("bilevel.critic.replay_capacity=10000000000000", "bilevel.critic.replay_capacity"),
        ("bilevel.critic.batch_size=10000000000000", "bilevel.critic.batch_size"),
        ("adapters.r=10000000000", "adapters.r"),
        ("reward.heads=10000000000", "reward.heads"),
        ("reward.hidden=10000000000", "reward.hidden"),
    ],
)
def test_a_run_beyond_free_memory_names_its_largest_factor(override, field):
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', '[.]')}: the run needs about .* GiB .*free on cpu; lower {field.replace('.', '[.]')} "):
        pf.preflight(tiny_recipe(override), CPU)


def test_a_run_that_fits_returns_its_estimate(monkeypatch):
    estimate = pf.preflight(tiny_recipe(), CPU)
    assert 0 < estimate.total < estimate.available and "estimated memory" in estimate.describe()
    monkeypatch.setattr(pf, "available_memory", lambda device: estimate.total - 1)
    with pytest.raises(ConfigError, match=r"more than the .* GiB free on cpu"):
        pf.preflight(tiny_recipe(), CPU)


def test_free_memory_is_read_from_the_kernel():
    free = pf.available_memory(CPU)
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def write_gguf(path: Path, **fields: int) -> None:
    writer = GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_token_list([f"t{i}" for i in range(10)])
    writer.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_shape_comes_from_its_header(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, context_length=64, embedding_length=4, block_count=2, feed_forward_length=8)
    assert gguf_shape(path) == Shape(context=64, hidden=4, layers=2, vocab=10, intermediate=8, tied=True)
    assert model_shape(ModelConfig(name=str(path))).context == 64


@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(range(256)) * 4, random.Random(0).randbytes(512)], ids=["empty", "bad-header", "random"])
def test_a_damaged_gguf_is_one_line(tmp_path, content):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^model\.name: .*m\.gguf is not a readable GGUF model \([^\n]*\)$"):
        model_shape(ModelConfig(name=str(path)))


def test_a_folder_without_a_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.name: cannot read the config of "):
        model_shape(ModelConfig(name=str(tmp_path)))


@pytest.mark.slow
def test_smollm2_context_is_read_from_its_gguf_header():
    """The issue's 10⁸-token rollout on the default model: refused from the GGUF metadata, no weights read."""
    recipe = parse_recipe({"prompts": {"train": "p.jsonl"}}, ["rollout.max_new_tokens=100000000"])
    assert model_shape(recipe.model).context == 8192
    with pytest.raises(ConfigError, match=r"^rollout\.max_new_tokens: .* exceed the 8192 positions of smollm2; set rollout\.max_new_tokens ≤ 7936"):
        pf.preflight(recipe, CPU)
