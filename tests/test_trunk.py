"""The trunk (`lm/trunk.py`) on the tiny random Llama: hidden states numbered as transformers numbers
them, a prompt's KV cache that continues as the whole rows do, and one that gradient checkpointing
replays without leaking the graph."""

import gc

import pytest
import torch

from conftest import perturb
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
from rlhf_bilevel.lm.trunk import PrefixCache, Trunk, positions
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME

PROMPTS = ["the dog is", "a good day for a walk", "the dog is", "a good day for a walk"]  # pairs share their prompt
RESPONSE = "happy and good"


@pytest.fixture(scope="module")
def lm(one_thread):
    """The tiny model with two adapters, both moved away from the base."""
    model, tokenizer = load_base(ModelConfig(name="tiny"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = with_adapters(model, AdapterConfig(r=4, alpha=8))
    for seed, adapter in enumerate((LAMBDA, LAMBDA_PRIME)):
        perturb([p for n, p in peft_model.named_parameters() if f".lora_B.{adapter}." in n], 0.3, seed=seed)
    tokenizer.padding_side = "left"
    prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    response = tokenizer([RESPONSE] * len(PROMPTS), return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompts["input_ids"], response], 1)
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(response)], 1)
    return peft_model, ids, mask, prompts["input_ids"].shape[1]


def trunk_of(model, gradient_checkpointing: bool = False) -> Trunk:
    return Trunk(model, autocast=False, gradient_checkpointing=gradient_checkpointing, compile=False)


def test_positions_count_the_real_tokens_of_left_padded_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions(mask, 2).tolist() == [[1, 2], [3, 4]]


@torch.no_grad()
def test_hidden_states_are_numbered_as_transformers_numbers_them_under_the_active_adapter(lm):
    model, ids, mask, _ = lm
    trunk = trunk_of(model)
    for adapter in (LAMBDA, None):
        with trunk.adapter(adapter):
            embeddings, middle, last = trunk.hidden_states(ids, mask, layers=(0, 1))
            whole = trunk(ids, mask)
        with trunk.adapter(adapter), trunk.activated():
            plain = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask, ids.shape[1]), output_hidden_states=True)
        torch.testing.assert_close(embeddings, plain.hidden_states[0])
        torch.testing.assert_close(middle, plain.hidden_states[1])
        torch.testing.assert_close(last, plain.hidden_states[trunk.num_layers])
        torch.testing.assert_close(whole, last)
    assert last.shape[-1] == trunk.feature_dim
    with trunk.adapter(LAMBDA):
        adapted = trunk(ids, mask)
    assert not torch.allclose(adapted, last)  # the adapter is on, and off under None


@torch.no_grad()
@pytest.mark.parametrize("growing", [False, True])
def test_a_shared_prompt_is_encoded_once_and_its_cache_continues_as_the_whole_rows(lm, growing):
    """The prompt cache holds each row's prompt but its last token, encoded once per distinct prompt;
    what follows it scores as the whole rows do. A `PrefixCache` is read and left as it was; a growing
    cache is extended, as decoding needs."""
    model, ids, mask, prompt_len = lm
    trunk = trunk_of(model)
    batch_sizes = []
    hook = trunk.decoder.register_forward_pre_hook(lambda m, a, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        past = trunk.prompt_cache(PROMPTS, ids[:, :prompt_len], mask[:, :prompt_len], growing=growing)
    finally:
        hook.remove()
    assert batch_sizes == [2] and isinstance(past, PrefixCache) != growing
    assert past.get_seq_length() == prompt_len - 1
    continued = trunk(ids[:, prompt_len - 1 :], mask, past=past)
    torch.testing.assert_close(continued, trunk(ids, mask)[:, prompt_len - 1 :], atol=1e-5, rtol=1e-5)
    assert past.get_seq_length() == (ids.shape[1] if growing else prompt_len - 1)
    assert trunk.prompt_cache(PROMPTS, ids[:, :1], mask[:, :1]) is None  # a one-token prompt leaves nothing to cache


def test_a_prefix_cache_hands_out_what_it_recorded_once():
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cache = PrefixCache(record=True)
    assert cache.update(keys, values, 0) == (keys, values)  # nothing before it: the new states alone
    (taken,) = cache.take()
    assert taken[0] is keys and taken[1] is values
    with pytest.raises(RuntimeError, match="taken already"):
        cache.take()


def test_nothing_of_a_checkpointed_gradient_outlives_it(lm):
    """The graph through a prompt's cache under gradient checkpointing is freed once its gradient is taken.
    A checkpointed layer's replay closure holds the prompt's cache; had the cache kept that layer's
    outputs, the cycle would run through the autograd graph, where Python's collector cannot break
    it, and every λ′ step would leak its whole graph (≈ 100 MB an outer step on SmolLM2)."""
    model, ids, mask, prompt_len = lm
    trunk = trunk_of(model, gradient_checkpointing=True)
    try:
        with trunk.adapter(LAMBDA_PRIME):
            before = graph_tensors()
            past = trunk.prompt_cache(PROMPTS, ids[:, :prompt_len], mask[:, :prompt_len])
            hidden = trunk(ids[:, prompt_len - 1 :], mask, past=past)
            grads = torch.autograd.grad(hidden.sum(), trunk.parameters_of(LAMBDA_PRIME))
            del past, hidden
    finally:
        model.gradient_checkpointing_disable()  # the other tests share this model
    assert all(g.abs().sum() > 0 for g in grads)
    assert graph_tensors() == before


def graph_tensors() -> int:
    """How many tensors with an autograd history are alive, cycles collected first."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


def test_an_adapter_on_the_output_layer_is_a_config_error():
    """log π applies the output layer by chunks with a backward of its own, which trains no weights of it."""
    model, _ = load_base(ModelConfig(name="tiny"))
    peft_model = with_adapters(model, AdapterConfig(r=2, alpha=4, target_modules=("q_proj", "lm_head")))
    with pytest.raises(ConfigError, match="adapters.target_modules.*lm_head"):
        trunk_of(peft_model)
