import subprocess
import sys

import pytest
import torch

from rlhf_bilevel.exact.testbed import Testbed, TestbedConfig


@pytest.fixture
def float64():
    """Exact comparisons run in double precision; the default dtype is restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: a tiny model gains nothing from threads (OpenMP spinning makes it
    crawl on a busy machine), and runs in this process then compute bit for bit as a subprocess with
    OMP_NUM_THREADS=1 does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def testbed(float64):
    return Testbed(TestbedConfig(prompts=3, vocab=4, horizon=3, reward_hidden=4, seed=0), beta=0.5, gamma=0.9, loss="bt_nll")


def perturb(params, scale: float, seed: int) -> None:
    """Moves an adapter away from π_ref so that gradients are not at a special point."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`rlhf-bilevel ARGS` in a fresh interpreter, as a user runs it: exit code, stdout, stderr."""
    return subprocess.run([sys.executable, "-m", "rlhf_bilevel_cli.app", *args], capture_output=True, text=True, cwd=cwd)
