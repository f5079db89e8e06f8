"""The output layer by chunks (`lm/logits.py`) against plain autograd on the whole tensor."""

import pytest
import torch
import torch.nn.functional as F

from rlhf_bilevel.lm import logits
from rlhf_bilevel.lm.logits import chosen_log_probs, log_softmax_head

VOCAB, DIM = 300, 16


@pytest.fixture
def small_chunks(monkeypatch):
    """7 tokens a chunk (7 · 300 · 4 bytes), so that the 5 × 6 tokens below take five chunks, the last one short."""
    monkeypatch.setattr(logits, "CHUNK_BYTES", 7 * VOCAB * 4)


def frozen_head(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, VOCAB, bias=bias)
    return head.requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_log_softmax_equals_autograd_in_value_and_gradient(small_chunks, bias):
    head = frozen_head(bias)
    hidden = torch.randn(5, 6, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(5, 6, VOCAB, generator=torch.Generator().manual_seed(2))
    chunked = log_softmax_head(hidden, head)
    plain = F.log_softmax(head(hidden), -1)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), hidden)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), hidden)
    torch.testing.assert_close(grad_chunked, grad_plain, atol=1e-5, rtol=1e-5)


def test_the_backward_keeps_only_the_hidden_states_and_the_result(small_chunks):
    """What autograd saves for the backward: the [.., d] input and the [.., V] output, which is
    returned anyway; the logits and the softmax of the backward pass exist a chunk at a time."""
    head = frozen_head(bias=True)
    hidden = torch.randn(5, 6, DIM, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = log_softmax_head(hidden, head)
    assert sorted(saved) == [hidden.numel(), out.numel()]


def test_chosen_log_probs_are_the_gathered_log_softmax(small_chunks):
    head = frozen_head(bias=True)
    hidden = torch.randn(5, 6, DIM, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(VOCAB, (5, 6), generator=torch.Generator().manual_seed(2))
    expected = F.log_softmax(head(hidden), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(chosen_log_probs(hidden, head, tokens), expected, atol=1e-6, rtol=1e-6)


def test_under_bf16_autocast_the_chunks_compute_as_the_whole_does(small_chunks):
    head = frozen_head(bias=False)
    hidden = torch.randn(5, 6, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        chunked = log_softmax_head(hidden, head)
        plain = F.log_softmax(head(hidden).float(), -1)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)  # the same bf16 products, chunk or whole
    (grad_chunked,) = torch.autograd.grad(chunked[..., 0].sum(), hidden)
    (grad_plain,) = torch.autograd.grad(plain[..., 0].sum(), hidden)
    # both backward passes multiply by W in bf16: 8 bits of mantissa
    torch.testing.assert_close(grad_chunked, grad_plain, atol=2e-2, rtol=2e-2)


def test_a_trainable_output_layer_is_refused():
    head = torch.nn.Linear(DIM, VOCAB)
    with pytest.raises(ValueError, match="lm_head"):
        log_softmax_head(torch.randn(2, DIM), head)
