"""Initial weights from a stream the caller owns: the weights torch's global seed gave, the global stream left alone."""

import pytest
import torch
from torch import nn

from rlhf_bilevel.environment import default_dtype
from rlhf_bilevel.seeding import GlobalRNG, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_draws_what_nn_linear_draws_under_the_same_seed(dtype, bias):
    with default_dtype(dtype), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = nn.Linear(7, 3, bias=bias)
    before = torch.get_rng_state()
    with default_dtype(dtype):
        layer = linear(7, 3, torch.Generator().manual_seed(5), bias=bias)
    assert torch.equal(torch.get_rng_state(), before)
    assert layer.weight.dtype == dtype and layer.weight.requires_grad
    assert torch.equal(layer.weight, expected.weight)
    assert (layer.bias is None) == (expected.bias is None)
    if bias:
        assert torch.equal(layer.bias, expected.bias)


def test_global_rng_blocks_draw_one_seeded_stream_and_give_the_callers_back():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = torch.rand(6)
    rng = GlobalRNG(3)
    outside = torch.get_rng_state()
    with rng:
        first = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), outside)
    torch.rand(5)  # the caller's draws in between change nothing inside
    with rng:
        rest = torch.rand(4)
    assert torch.equal(torch.cat([first, rest]), expected)
