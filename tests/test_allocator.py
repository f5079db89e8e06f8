"""`return_freed_memory`: after it, tensors freed once a larger one has been freed leave the resident set.

Each case runs in a fresh interpreter (the allocator's state is per process): one 16 MB tensor
is made and freed (which, left alone, raises glibc's mmap threshold to 16 MB), then twenty 4 MB
tensors are made, a 64 KB one after them (so that no trim of the heap's top can release
them), and the twenty are freed. Their 80 MB stay resident with the dynamic threshold and
leave with the fixed one; the test asks for a 40 MB difference.
"""

import subprocess
import sys

import pytest

from rlhf_bilevel.allocator import return_freed_memory

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


def resident_kb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set_once_the_threshold_is_fixed():
    if not return_freed_memory():
        pytest.skip("the C library has no mallopt")
    assert resident_kb("dynamic") - resident_kb("fixed") > 40 * 1024


@pytest.mark.parametrize("asked", [True, False])
def test_a_run_fixes_the_threshold_only_when_its_recipe_asks(monkeypatch, tmp_path, asked):
    from pathlib import Path

    from rlhf_bilevel import train
    from rlhf_bilevel.recipe import load_recipe

    calls = []
    monkeypatch.setattr(train, "return_freed_memory", lambda: calls.append(True) or True)
    recipes = Path(__file__).parents[1] / "recipes"
    recipe = load_recipe(recipes / "tiny-debug.yaml", [f"train.return_freed_memory={str(asked).lower()}"])
    train.Trainer(recipe, tmp_path, recipes)
    assert calls == ([True] if asked else [])
