"""`return_freed_memory`: after it, tensors freed once a larger one has been freed leave the resident set.

Each case runs in a fresh interpreter (the allocator's state is per process): one 16 MB tensor
is made and freed (which, left alone, raises glibc's mmap threshold to 16 MB), then twenty 4 MB
tensors are made, a 64 KB one after them (so that no trim of the heap's top can release
them), and the twenty are freed. Their 80 MB stay resident with the dynamic threshold and
leave with the fixed one; the test asks for a 40 MB difference.
"""

import ctypes
import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from rlhf_bilevel.allocator import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
big = torch.ones(4 << 20); del big
blocks = [torch.ones(1 << 20) for _ in range(20)]
after = torch.ones(16 << 10)
del blocks
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")))
"""


def has_mallopt() -> bool:
    """Asked without calling it: fixing the threshold in this process would slow every later test."""
    return hasattr(ctypes.CDLL(None), "mallopt")


def resident_kb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set_once_the_threshold_is_fixed():
    if not has_mallopt():
        pytest.skip("the C library has no mallopt")
    assert resident_kb("dynamic") - resident_kb("fixed") > 40 * 1024


@pytest.mark.parametrize("asked", [True, False])
def test_a_run_fixes_the_threshold_only_when_its_recipe_asks(monkeypatch, tmp_path, asked):
    from pathlib import Path

    from rlhf_bilevel.commands import train
    from rlhf_bilevel.recipe import load_recipe

    calls = []
    monkeypatch.setattr(train, "return_freed_memory", lambda: calls.append(True) or True)
    recipes = Path(__file__).parents[1] / "recipes"
    recipe = load_recipe(recipes / "tiny-debug.yaml", [f"train.return_freed_memory={str(asked).lower()}"])
    train.build(recipe, tmp_path, recipes)
    assert calls == ([True] if asked else [])


HEAP_SCRIPT = """
import torch
from rlhf_bilevel.allocator import heap_reuse, return_freed_memory
def resident():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
assert return_freed_memory()
with heap_reuse():
    blocks = [torch.ones(1 << 20) for _ in range(20)]
    after = torch.ones(16 << 10)
    del blocks
    inside = resident()
print(inside, resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_heap_reuse_keeps_freed_blocks_for_reuse_then_returns_them():
    if not has_mallopt():
        pytest.skip("the C library has no mallopt")
    done = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True)
    inside, after = map(int, done.stdout.split())
    # inside, the twenty freed 4 MB blocks stay in the heap for the next allocation; on exit they leave
    assert inside - after > 40 * 1024


def test_sampling_runs_on_the_heap_and_trims_it_after(monkeypatch):
    import torch

    from rlhf_bilevel import allocator
    from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
    from rlhf_bilevel.lm.policy import LMPolicy, RolloutConfig

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append(("mallopt", option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    base, tokenizer = load_base(ModelConfig(name="tiny"))
    policy = LMPolicy(with_adapters(base, AdapterConfig(r=2, alpha=4)), tokenizer, RolloutConfig(max_new_tokens=2), chat_template=False)
    monkeypatch.setattr(allocator, "_libc", Libc)
    monkeypatch.setattr(allocator, "_fixed", False)
    policy.sample(["a good day"], torch.Generator().manual_seed(0))
    assert calls == []  # the threshold was never fixed: glibc is left alone
    monkeypatch.setattr(allocator, "_fixed", True)
    policy.sample(["a good day"], torch.Generator().manual_seed(0))
    threshold = allocator.M_MMAP_THRESHOLD
    assert calls == [("mallopt", threshold, allocator.HEAP_THRESHOLD), ("mallopt", threshold, allocator.THRESHOLD), ("malloc_trim", 0)]


HUGE_SCRIPT = """
import rlhf_bilevel_cli.app  # what the command imports first; it must decide before torch is imported
import torch
tensor = torch.ones(16 << 20)  # 64 MB, every page written
print(next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")))
"""
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_kb(**env: str) -> int:
    import os

    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", HUGE_SCRIPT], capture_output=True, text=True, check=True, env={**clean, **env})
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's transparent huge pages")
def test_the_command_backs_large_tensors_with_huge_pages_unless_the_environment_says_no():
    from pathlib import Path

    mode = Path(THP_MODE).read_text() if Path(THP_MODE).exists() else "[never]"
    if "[madvise]" not in mode:  # `always` gives huge pages to both; `never` to neither
        pytest.skip(f"the kernel's THP mode is not madvise: {mode.strip()}")
    assert huge_kb() >= 32 * 1024
    assert huge_kb(THP_MEM_ALLOC_ENABLE="0") < 8 * 1024
