"""What decides a run's numbers beyond its recipe and seed, recorded in its run.json; and the
process-wide torch settings a run needs, set for its duration and then restored.

The number of CPU threads decides how torch splits a sum between them, and so the last bits
of every result: a run takes it from its recipe (`train.threads`), never from OMP_NUM_THREADS
or from how busy the machine is. The CPU's instruction sets decide which kernels run (bf16 is
native with avx512_bf16 or AMX, emulated elsewhere), and with the library versions they are
why two machines give two results for one seed.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from importlib import metadata
from typing import Callable, ContextManager, Iterator, TypeVar

import torch

T = TypeVar("T")

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "tokenizers")
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
"""The instruction sets that decide which kernels torch's CPU build picks (x86; `/proc/cpuinfo` names)."""

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's reproducible workspace setting, which torch's deterministic mode asks for on CUDA."""


def available_cores() -> int:
    """The CPU cores this process may run on (a SLURM or taskset allotment, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_threads(requested: int | None) -> int:
    """The CPU threads of a run: `requested`, or (None) this process's share of its cores when a
    launch starts several processes on one machine (LOCAL_WORLD_SIZE)."""
    if requested is not None:
        return requested
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextmanager
def changed(get: Callable[[], T], put: Callable[[T], object], value: T) -> Iterator[None]:
    """A process-wide setting, read by `get` and written by `put`, set to `value` for the block."""
    previous = get()
    put(value)
    try:
        yield
    finally:
        put(previous)


def threads(count: int) -> ContextManager[None]:
    """torch's intra-op threads set to `count` for the block."""
    return changed(torch.get_num_threads, torch.set_num_threads, count)


def default_dtype(dtype: torch.dtype) -> ContextManager[None]:
    """torch's default floating dtype set to `dtype` for the block."""
    return changed(torch.get_default_dtype, torch.set_default_dtype, dtype)


@contextmanager
def reproducible(count: int, device: torch.device | str) -> Iterator[None]:
    """What a seeded run needs to repeat bit for bit on one machine, for the block: `count` CPU
    threads, and on CUDA torch's deterministic kernels (a kernel without one warns) with the cuBLAS
    workspace they need. On a CPU, torch's kernels are deterministic at a fixed thread count."""
    cuda = torch.device(device).type == "cuda"
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with threads(count):
            yield
    finally:
        if cuda:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            if workspace is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def cpu() -> dict:
    """The CPU's model name, the flags of `CPU_FLAGS` it has, its core count, and the instruction
    set torch's kernels dispatch to."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break  # every core lists the same: the first is enough
    except OSError:  # not on Linux
        pass
    return {
        "model": model,
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def versions() -> dict[str, str | None]:
    """Python's version and those of the libraries in `LIBRARIES` (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(device: torch.device | str, dtype: torch.dtype, autocast: bool) -> dict:
    """What decides the numbers of a run on `device` whose frozen base is in `dtype`, with its
    forwards under bf16 autocast or not: the machine, the libraries and torch's settings now."""
    device = torch.device(device)
    found = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "autocast": "bfloat16" if autocast else None,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cpu": cpu(),
        "versions": versions(),
    }
    if device.type == "cuda":
        found["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return found


def quiet_libraries() -> None:
    """Process-wide, for commands only: Hugging Face's messages below errors and its download and
    loading bars off, so that the command's own progress is the one to watch."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
