"""Checkpoints: exact round trip of a training state, resume equals no-kill, corruption is caught."""

import json
import math
import pickle

import pytest
import torch

from rlhf_bilevel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def train(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


def realistic_state() -> tuple[dict, list[torch.Tensor], torch.optim.Adam]:
    """An Adam state after a few steps, a generator state, counters and a nested config."""
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)]
    optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99))
    train(params, optimizer, steps=3, seed=0)
    generator = torch.Generator().manual_seed(7)
    torch.rand(5, generator=generator)
    state = {
        "params": [p.detach().clone() for p in params],
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "t": 3,
        "oracle_pairs": 120,
        "mask": torch.tensor([True, False]),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "config": {
            "bilevel": {"sigma": 0.1, "inner_steps": 4, "method": "bilevel", "max_norm": None, "sweep": (0.1, 0.01)},
            "seed": 0,
            "flags": [True, 1, 1.0, "1"],
            "$odd": "a key that looks like a tag",
            "limits": {"low": -math.inf, "nan": math.nan},
        },
    }
    return state, params, optimizer


def assert_same(a, b, where="state"):
    """Equal value by value AND type by type: 1 is not 1.0, a tuple is not a list, key 0 is not '0'."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} became {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} became {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} became {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: nan became {b}"
    else:
        assert a == b, f"{where}: {a!r} became {b!r}"


def test_round_trip_keeps_values_types_and_int_keys(tmp_path):
    state, _, _ = realistic_state()
    assert 0 in state["optimizer"]["state"]  # torch keys the optimizer state by int: it must stay so
    loaded = load_checkpoint(save_checkpoint(tmp_path, 3, state))
    assert_same(state, loaded)


def test_the_comparison_itself_sees_a_type_change():
    with pytest.raises(AssertionError, match="int became float"):
        assert_same({"t": 3}, {"t": 3.0})
    with pytest.raises(AssertionError, match="keys"):
        assert_same({0: 1}, {"0": 1})


def test_resumed_adam_takes_the_same_next_step(tmp_path):
    state, params, optimizer = realistic_state()
    path = save_checkpoint(tmp_path, 3, state)
    train(params, optimizer, steps=2, seed=1)  # the uninterrupted run

    loaded = load_checkpoint(path)
    resumed = [p.clone().requires_grad_(True) for p in loaded["params"]]
    resumed_optimizer = torch.optim.Adam(resumed, lr=0.5)  # the saved hyper-parameters must win
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    train(resumed, resumed_optimizer, steps=2, seed=1)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)

    generator = torch.Generator()
    generator.set_state(loaded["generator"])
    expected = torch.Generator().manual_seed(7)
    torch.rand(5, generator=expected)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=expected))


def test_no_pickle_on_load(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, realistic_state()[0])

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(path)
    assert {p.name for p in path.iterdir()} == {"state.safetensors", "state.json", "manifest.json"}


def test_corrupt_byte_is_caught_and_latest_falls_back(tmp_path):
    state = {"w": torch.arange(100.0), "t": 1}
    good = save_checkpoint(tmp_path, 1, state)
    bad = save_checkpoint(tmp_path, 2, {"w": torch.arange(100.0) + 1, "t": 2})
    blob = bytearray((bad / "state.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # inside the tensor data: safetensors itself would load it without complaint
    (bad / "state.safetensors").write_bytes(bytes(blob))

    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_checkpoint(bad)
    with pytest.warns(RuntimeWarning, match="checkpoint-000002"):
        assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(good)["t"] == 1


def test_missing_and_truncated_files_are_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})
    (path / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="state.json: 2 bytes"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json: missing"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(path)


def test_unfinished_save_is_ignored(tmp_path):
    good = save_checkpoint(tmp_path, 4, {"t": 4})
    leftover = tmp_path / "checkpoint-000009.tmp"  # a kill during the save of step 9
    leftover.mkdir()
    (leftover / "state.json").write_text('{"t": 9}')
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(leftover) is None


def test_save_over_the_same_step_and_a_stale_tmp(tmp_path):
    (tmp_path / "checkpoint-000005.tmp").mkdir()
    (tmp_path / "checkpoint-000005.tmp" / "junk").write_text("from a killed save")
    save_checkpoint(tmp_path, 5, {"t": 1})
    path = save_checkpoint(tmp_path, 5, {"t": 2})
    assert load_checkpoint(path) == {"t": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000005"]


def test_extra_files_are_in_the_manifest(tmp_path):
    def write_adapters(folder):
        (folder / "lambda").mkdir()
        (folder / "lambda" / "adapter_model.safetensors").write_bytes(b"weights")

    path = save_checkpoint(tmp_path, 1, {"t": 1}, write_extra=write_adapters)
    manifest = json.loads((path / "manifest.json").read_text())
    assert "lambda/adapter_model.safetensors" in manifest["files"]
    (path / "lambda" / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_checkpoint(path)


def test_keep_prunes_older_but_not_later_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 9, {"t": 9})  # from an earlier history, resumed from before it
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"t": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000004", "checkpoint-000005", "checkpoint-000009"]


def test_unsupported_values_fail_loudly(tmp_path):
    with pytest.raises(TypeError, match="/model: cannot save a Linear"):
        save_checkpoint(tmp_path, 1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="dict key"):
        save_checkpoint(tmp_path, 1, {"bad": {(1, 2): 3}})
    assert not any(tmp_path.iterdir())
