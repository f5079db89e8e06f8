"""scripts/gpu-smoke.sh stops loudly where there is no GPU. (`scripts/gpu-smoke.sh --cpu` runs its commands
and flags on the CPU in about 3 minutes: too long for the suite, run it after changing the script.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"


def smoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_without_a_gpu_it_fails_at_the_cuda_check_before_anything_runs(tmp_path):
    done = smoke(str(tmp_path / "out"))
    assert done.returncode == 1
    assert "gpu-smoke: FAILED at 'CUDA is available'" in done.stderr
    assert "torch" in done.stderr  # says why: a CPU-only build, or no GPU seen
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_refused(tmp_path):
    done = smoke("--cpu", str(tmp_path))
    assert done.returncode == 2 and "already exists" in done.stderr

