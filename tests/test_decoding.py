"""Decoding (`lm/decoding.py`): inverse-CDF draws with exact probabilities, and a batch whose rows
each draw what they draw alone, on the tiny random Llama."""

import pytest
import torch
import torch.nn.functional as F

from conftest import perturb
from rlhf_bilevel.lm.decoding import decode, inverse_cdf, through_eos
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
from rlhf_bilevel.lm.trunk import Trunk
from rlhf_bilevel.types import LAMBDA

PROMPTS = ["the dog is", "a good day for a walk", "tell me", "my neighbour said the weather was"]


def test_inverse_cdf_draws_each_token_with_its_probability():
    """Over uniforms spread evenly on [0, 1), token k is drawn for a share π(k) of them, to the grid's
    resolution, and its log π is the softmax's."""
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(0)) * 2
    grid = 100_000
    uniforms = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    for row in range(2):
        tokens, logp = inverse_cdf(logits[row].expand(grid, -1), uniforms)
        shares = torch.bincount(tokens, minlength=7).double() / grid
        probs = F.softmax(logits[row].double(), -1)
        torch.testing.assert_close(shares, probs, atol=1 / grid, rtol=0)
        torch.testing.assert_close(logp, probs.log()[tokens])


def test_a_row_draws_from_its_own_logits_and_uniform_only():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    uniforms = torch.rand(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tokens, logp = inverse_cdf(logits, uniforms)
    for i in range(3):
        alone = inverse_cdf(logits[i : i + 1], uniforms[i : i + 1])
        assert alone[0].item() == tokens[i].item() and alone[1].item() == logp[i].item()


def test_the_mask_runs_through_the_first_eos_only():
    eos = 5
    tokens = torch.tensor([[1, eos, 2, eos], [1, 2, 3, 4], [eos, eos, 1, 2]])
    assert through_eos(tokens, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.fixture(scope="module")
def eos_model(one_thread):
    """The tiny model with λ away from the base and an output bias that makes EOS likely (p ≈ 0.22 a token),
    so that rows finish at different steps."""
    model, tokenizer = load_base(ModelConfig(name="tiny"))
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 4.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = with_adapters(model.eval(), AdapterConfig(r=4, alpha=8))
    perturb([p for n, p in peft_model.named_parameters() if f".lora_B.{LAMBDA}." in n], 0.3, seed=1)
    tokenizer.padding_side = "left"
    return peft_model, tokenizer


@torch.no_grad()
def test_a_row_leaves_the_decoding_batch_at_its_eos_and_keeps_its_tokens(eos_model):
    """Decoding step h computes only the rows still running (those whose mask is 1 at h), and each
    row draws the very tokens it draws alone, so rows finishing beside it change nothing."""
    model, tokenizer = eos_model
    trunk = Trunk(model, autocast=False, gradient_checkpointing=False, compile=False)
    prompts = PROMPTS * 4
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    uniforms = torch.rand(len(prompts), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def drawn(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with trunk.activated():
            past = trunk.prompt_cache(prompts[rows], ids[rows], mask[rows], growing=True)
            return decode(model, ids[rows], mask[rows], past, uniforms[rows], tokenizer.eos_token_id, tokenizer.pad_token_id)

    batch_sizes = []
    hook = trunk.decoder.register_forward_pre_hook(  # every pass runs the decoder
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        tokens, taken = drawn(slice(None))
    finally:
        hook.remove()
    running = through_eos(tokens, tokenizer.eos_token_id).sum(0).long().tolist()  # rows still running at each step
    steps = len([n for n in running if n > 0])
    assert running[0] == 16 and min(running[:steps]) < 12, "the test needs rows that stop early"
    assert batch_sizes == [len(PROMPTS)] + running[:steps]  # the distinct prompts' cache, then one pass a step
    assert (tokens[through_eos(tokens, tokenizer.eos_token_id) == 0] == tokenizer.pad_token_id).all()
    assert (taken[through_eos(tokens, tokenizer.eos_token_id) == 0] == 0).all()
    for i in (0, 5, 11):
        alone = drawn(slice(i, i + 1))
        assert torch.equal(alone[0][0], tokens[i])
        torch.testing.assert_close(alone[1][0], taken[i], atol=1e-5, rtol=0)
