"""What run.json records of the numerics, and the process settings a run sets and gives back."""

import json
import os
from importlib import metadata

import pytest
import torch

from rlhf_bilevel import environment
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.recipe import MAX_THREADS, parse_recipe

PROMPTS = {"prompts": {"train": "data/prompts-train.jsonl"}}


def test_describe_records_what_decides_the_numbers():
    found = environment.describe("cpu", torch.bfloat16, autocast=True)
    json.dumps(found)  # it goes into run.json as it is
    assert found["device"] == "cpu" and found["dtype"] == "bfloat16" and found["autocast"] == "bfloat16"
    assert found["threads"] == torch.get_num_threads()
    assert found["versions"]["torch"] == torch.__version__
    assert found["versions"]["transformers"] == metadata.version("transformers")
    assert {"peft", "trl", "accelerate"} <= found["versions"].keys()
    cpu = found["cpu"]
    assert cpu["model"] and cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["flags"]) <= set(environment.CPU_FLAGS)
    assert environment.describe("cpu", torch.float32, autocast=False)["autocast"] is None


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_cpu_flags_are_those_the_kernel_reports():
    with open("/proc/cpuinfo", encoding="utf-8") as lines:
        flags = next(line for line in lines if line.startswith("flags")).split(":")[1].split()
    assert environment.cpu()["flags"] == [flag for flag in environment.CPU_FLAGS if flag in flags]


def test_default_threads_ignore_omp_num_threads_and_share_the_cores_of_a_launch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = environment.available_cores()
    assert environment.run_threads(None) == cores
    assert environment.run_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert environment.run_threads(None) == 1


@pytest.mark.parametrize("threads", [0, -1, MAX_THREADS + 1])
def test_a_thread_count_out_of_range_is_refused(threads):
    with pytest.raises(ConfigError, match="train.threads"):
        parse_recipe({**PROMPTS, "train": {"threads": threads}})


def test_settings_come_back_after_the_block():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with environment.threads(threads + 1), environment.default_dtype(torch.float64):
        assert torch.get_num_threads() == threads + 1 and torch.get_default_dtype() == torch.float64
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype
    with pytest.raises(RuntimeError), environment.threads(threads + 1):
        raise RuntimeError
    assert torch.get_num_threads() == threads


def test_reproducible_turns_on_deterministic_kernels_on_cuda_only_and_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with environment.reproducible(1, "cpu"):
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    # switching the mode needs no GPU: only running a kernel would
    with environment.reproducible(1, "cuda"):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == environment.CUBLAS_WORKSPACE
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_quiet_libraries_is_for_commands_and_loading_a_model_leaves_logging_alone():
    from transformers.utils import logging as hf_logging

    from rlhf_bilevel.lm.model import ModelConfig, load_base

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        load_base(ModelConfig(name="tiny"))
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
        environment.quiet_libraries()
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
