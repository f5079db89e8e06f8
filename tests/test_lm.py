"""The Hugging Face token MDP (`lm/`) on the tiny random Llama, checked against independent computations.

Every model here is `model.name: tiny` with two rank-4 LoRA adapters. Where the exact
enumerable MDP compares an estimator with autograd on an enumerated sum, so does this
file: the tiny vocabulary has V = 192 tokens, so all V² two-token continuations of one
prompt fit in a single forward pass. λ is perturbed away from π_ref wherever a test
would otherwise pass at the special point λ = λ′ = π_ref. Two variants of the base are
built as well: one whose output bias makes EOS likely, and one with a larger tied
embedding, whose policies are far from uniform, so that λ can move far from π_ref.
"""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import flat, perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.critic import CriticConfig, TDCritic
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.lm.heads import RewardConfig, TokenReward, VocabQHead
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
from rlhf_bilevel.lm.policy import LMContext, LMPolicy, RolloutConfig
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, Rollout

PROMPTS = ["the dog is", "a good day for a walk", "tell me", "my neighbour said the weather was"]
GAMMA = 0.9
EOS_BIAS = 4.0  # p(EOS) ≈ e⁴ / (e⁴ + 191) ≈ 0.22 per token on the near-uniform tiny model


def shape_base(model, tokenizer, eos_bias: float, embedding_scale: float):
    """Optional changes to the tiny base: an output bias that makes EOS likely (so masking is exercised on
    sampled rollouts), and a larger tied embedding that makes π far from uniform and λ able to move far from π_ref."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embedding_scale)  # tied: the output embedding too
    if eos_bias:
        bias = torch.zeros(model.config.vocab_size)
        bias[tokenizer.eos_token_id] = eos_bias
        model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return model.eval().requires_grad_(False)


def make_lm(eos_bias: float = 0.0, embedding_scale: float = 1.0) -> SimpleNamespace:
    model, tokenizer = load_base(ModelConfig(name="tiny"))
    shape_base(model, tokenizer, eos_bias, embedding_scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator
        peft_model = with_adapters(model, AdapterConfig(r=4, alpha=8))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora" in n}

    def independent():
        """The same base built again (same seed), never wrapped by peft: the reference by construction."""
        return shape_base(tiny.build(0)[0], tokenizer, eos_bias, embedding_scale)

    return SimpleNamespace(base=model, model=peft_model, tokenizer=tokenizer, lora=lora, independent=independent)


def policy_of(lm: SimpleNamespace, horizon: int, **kwargs) -> LMPolicy:
    return LMPolicy(lm.model, lm.tokenizer, RolloutConfig(max_new_tokens=horizon, **kwargs), chat_template=False)


def lora_b(lm: SimpleNamespace, adapter: str) -> list[torch.Tensor]:
    return [p for n, p in lm.model.named_parameters() if f".lora_B.{adapter}." in n]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and OpenMP spinning makes it crawl on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lm_module():
    return make_lm()


@pytest.fixture(scope="module")
def eos_module():
    return make_lm(eos_bias=EOS_BIAS)


@pytest.fixture(scope="module")
def sharp_module():
    return make_lm(embedding_scale=10.0)


def restoring(lm: SimpleNamespace):
    saved = {n: p.detach().clone() for n, p in lm.lora.items()}
    yield lm
    with torch.no_grad():
        for n, p in lm.lora.items():
            p.copy_(saved[n])


@pytest.fixture
def lm(lm_module):
    """The shared tiny model; whatever a test does to its adapters is undone afterwards."""
    yield from restoring(lm_module)


@pytest.fixture
def eos_lm(eos_module):
    yield from restoring(eos_module)


def real_prompt(rollout: Rollout, i: int) -> torch.Tensor:
    ctx: LMContext = rollout.context
    return ctx.input_ids[i, : ctx.prompt_len][ctx.attention_mask[i, : ctx.prompt_len].bool()]


def first_eos_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    mask = torch.zeros(tokens.shape)
    for i, row in enumerate(tokens.tolist()):
        for h, token in enumerate(row):
            mask[i, h] = 1.0
            if token == eos:
                break
    return mask


@torch.no_grad()
def sequence_log_probs(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """log π(a_h|s_h) of each response token by one unpadded forward of prompt ⊕ response, gathered by hand."""
    ids = torch.cat([prompt, response])[None]
    logits = model(input_ids=ids).logits[0].float()
    steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return F.log_softmax(logits[steps], -1)[torch.arange(len(response)), response]


# -- 1. the sampled log-probabilities are the ones a forward pass gives ----------------------------
@pytest.mark.parametrize("perturbed", [False, True])
def test_sampled_logp_matches_forward_pass_and_ref_logp_matches_disabled_adapters(lm, perturbed):
    """Sampling's logp equals a recomputed forward under λ (also after λ moves), and ref_logp that of adapter(None)."""
    if perturbed:
        perturb(lora_b(lm, LAMBDA), 0.3, seed=1)
    policy = policy_of(lm, horizon=5)
    rollout = policy.sample(PROMPTS * 2, torch.Generator().manual_seed(0))
    assert rollout.adapter == LAMBDA and rollout.tokens.shape == (8, 5)
    with policy.adapter(LAMBDA):
        log_probs = policy.log_probs(rollout)
    assert log_probs.shape == (8, 5, policy.vocab_size) and log_probs.requires_grad
    torch.testing.assert_close(est.taken_log_probs(log_probs, rollout).detach(), rollout.logp, atol=1e-5, rtol=0)
    with policy.adapter(None), torch.no_grad():
        ref = est.taken_log_probs(policy.log_probs(rollout), rollout)
    torch.testing.assert_close(ref, rollout.ref_logp, atol=1e-5, rtol=0)
    gap = (rollout.logp - rollout.ref_logp).abs().max().item()
    assert gap > 1e-2 if perturbed else gap < 1e-5  # λ = π_ref exactly at init (LoRA B = 0), not after


def test_a_prompt_shared_by_several_rows_is_encoded_once_per_pass(lm, monkeypatch):
    """Pairs share their prompt (eq. 7): the policy's and the reference's pass each encode it once
    and copy its KV cache, and the rows still score as the previous test checks."""
    policy = policy_of(lm, horizon=3)
    encoded = []
    hidden_states = policy.trunk.hidden_states

    def counting(input_ids, attention_mask, past=None, layers=()):
        if past is not None and past.get_seq_length() == 0:
            encoded.append((policy.active, input_ids.shape[0]))
        return hidden_states(input_ids, attention_mask, past, layers)

    monkeypatch.setattr(policy.trunk, "hidden_states", counting)
    rollout = policy.sample([p for p in PROMPTS[:3] for _ in range(2)], torch.Generator().manual_seed(0))
    assert encoded == [(LAMBDA, 3), (None, 3)]
    assert rollout.prompts[0] == rollout.prompts[1] and rollout.responses[0] != rollout.responses[1]
    with policy.adapter(LAMBDA_PRIME):
        policy.log_probs(rollout)
    assert encoded[2:] == [(LAMBDA_PRIME, 3)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rows_that_share_a_prompt_score_and_differentiate_as_whole_rows(lm, checkpointing):
    """log π of pairs, whose prompt is encoded once and its cache shared, equals one forward of each
    whole row, in value and in the gradient in λ′ (which must reach the prompt through the cache);
    with gradient checkpointing too, whose layers replay their forward with the prompt's cache."""
    perturb(lora_b(lm, LAMBDA_PRIME), 0.3, seed=3)
    policy = policy_of(lm, horizon=4, gradient_checkpointing=checkpointing)
    replays = []
    if checkpointing:
        layer = lm.model.get_base_model().model.layers[0]
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, **k: replays.append(1) or checkpoint(*a, **k)
    params = policy.parameters_of(LAMBDA_PRIME)
    try:
        with policy.adapter(LAMBDA_PRIME):
            rollout = policy.sample([p for p in PROMPTS[:3] for _ in range(2)], torch.Generator().manual_seed(3))
            shared = policy.log_probs(rollout)
            ctx = rollout.context
            # the output layer by plain autograd, where `log_probs` applies it by chunks with a backward of its own
            whole = F.log_softmax(policy.head(policy.trunk(ctx.input_ids[:, :-1], ctx.attention_mask[:, :-1])[:, -4:]).float(), -1)
    finally:
        if checkpointing:
            del layer._gradient_checkpointing_func  # the counting wrapper goes, then checkpointing:
            lm.model.gradient_checkpointing_disable()  # the other tests share this model
    assert len(replays) == (3 if checkpointing else 0)  # the prompt's encoding, the shared rows, the whole rows
    weights = torch.randn(shared.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    grad_shared = flat(torch.autograd.grad((shared * weights).sum(), params))
    grad_whole = flat(torch.autograd.grad((whole * weights).sum(), params))
    # float32 rounding differs between the two orders of summation: 1e-4 of the gradient's scale
    torch.testing.assert_close(grad_shared, grad_whole, rtol=1e-4, atol=1e-4 * grad_whole.abs().max().item())


def test_a_piece_of_a_rollout_scores_as_its_rows_of_the_whole(lm):
    """Rollout.rows keeps each row's context (ids, mask, features): the micro-batches of a policy step."""
    perturb(lora_b(lm, LAMBDA), 0.3, seed=1)
    policy = policy_of(lm, horizon=4)
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(2))
    piece = rollout.rows(slice(1, 3))
    assert piece.prompts == rollout.prompts[1:3] and torch.equal(piece.tokens, rollout.tokens[1:3])
    with torch.no_grad():
        torch.testing.assert_close(policy.log_probs(piece), policy.log_probs(rollout)[1:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.state_features(piece), rollout.context.features[1:3])


# -- 2. λ′ starts at λ; the reference is the base with adapters off; one copy of the base ------------
def test_lambda_prime_starts_at_lambda_and_reference_is_the_single_base(lm):
    """λ′ = λ at init (same A, B), π_ref = λ at init, moving λ leaves π_ref = base unchanged, and the base exists once."""
    fresh_base = lm.independent()
    base_count = sum(p.numel() for p in fresh_base.parameters())
    assert sum(p.numel() for n, p in lm.model.named_parameters() if "lora" not in n) == base_count
    assert lm.model.get_base_model() is lm.base  # wrapped in place, not copied
    for name, p in lm.lora.items():
        if f".{LAMBDA}." in name:
            torch.testing.assert_close(p, lm.lora[name.replace(f".{LAMBDA}.", f".{LAMBDA_PRIME}.")], atol=0, rtol=0)

    policy = policy_of(lm, horizon=4)
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(1))

    def scores(name):
        with policy.adapter(name), torch.no_grad():
            return policy.log_probs(rollout)

    reference = scores(None)
    torch.testing.assert_close(scores(LAMBDA), reference, atol=1e-6, rtol=0)
    # the same move of both B matrices keeps λ′ = λ only if their A matrices were copied, not redrawn
    perturb(lora_b(lm, LAMBDA), 0.3, seed=2)
    perturb(lora_b(lm, LAMBDA_PRIME), 0.3, seed=2)
    lam = scores(LAMBDA)
    torch.testing.assert_close(scores(LAMBDA_PRIME), lam, atol=1e-6, rtol=0)
    assert (lam - reference).abs().max() > 1e-2
    # now move λ alone: λ′ and π_ref stay where they were, and π_ref is the untouched base
    perturb(lora_b(lm, LAMBDA), 0.3, seed=3)
    assert (scores(LAMBDA) - lam).abs().max() > 1e-2
    torch.testing.assert_close(scores(LAMBDA_PRIME), lam, atol=1e-6, rtol=0)
    torch.testing.assert_close(scores(None), reference, atol=0, rtol=0)
    for i in range(len(rollout)):
        direct = sequence_log_probs(fresh_base, real_prompt(rollout, i), rollout.tokens[i])
        torch.testing.assert_close(scores(None)[i].gather(-1, rollout.tokens[i, :, None]).squeeze(-1), direct, atol=1e-5, rtol=0)


# -- 3. EOS is absorbing --------------------------------------------------------------------------
def test_eos_is_absorbing_in_mask_logp_and_estimators(eos_lm):
    """The mask is 1 through the first EOS then 0, logp/ref_logp vanish after it, and returns/KL ignore those positions."""
    perturb(lora_b(eos_lm, LAMBDA), 0.3, seed=1)
    policy = policy_of(eos_lm, horizon=6)
    eos = eos_lm.tokenizer.eos_token_id
    rollout = policy.sample(PROMPTS * 4, torch.Generator().manual_seed(0))
    expected = first_eos_mask(rollout.tokens, eos)
    lengths = expected.sum(-1)
    assert ((lengths < 6) & (lengths >= 2)).sum() >= 3, "the test needs EOS in mid-sequence"
    assert (lengths == 6).sum() >= 1
    torch.testing.assert_close(rollout.mask, expected, atol=0, rtol=0)
    after = rollout.mask == 0
    assert (rollout.logp[after] == 0).all() and (rollout.ref_logp[after] == 0).all()
    assert (rollout.logp[~after] < 0).all() and (rollout.ref_logp[~after] < 0).all()
    for i, response in enumerate(rollout.responses):  # the response text stops before EOS
        n = int(lengths[i]) - int(rollout.tokens[i, int(lengths[i]) - 1] == eos)
        assert response == eos_lm.tokenizer.decode(rollout.tokens[i, :n], skip_special_tokens=True).strip()
    with policy.adapter(LAMBDA), torch.no_grad():  # scoring again: the same log-probs up to and including EOS
        torch.testing.assert_close(est.taken_log_probs(policy.log_probs(rollout), rollout), rollout.logp, atol=1e-5, rtol=0)

    # whatever sits after EOS — rewards, log-probs — the estimators never see it
    garbage = torch.randn(rollout.tokens.shape, generator=torch.Generator().manual_seed(4)) * 10
    dirty = replace(rollout, logp=torch.where(after, garbage, rollout.logp), ref_logp=torch.where(after, -garbage, rollout.ref_logp))
    ones = torch.ones(rollout.tokens.shape)
    expected_returns = torch.tensor([sum(GAMMA**h for h in range(int(n))) for n in lengths])
    torch.testing.assert_close(est.returns(rollout, ones, GAMMA), expected_returns)
    torch.testing.assert_close(est.returns(dirty, torch.where(after, garbage, ones), GAMMA), expected_returns)
    torch.testing.assert_close(est.kl_to_reference(dirty), est.kl_to_reference(rollout))
    kl_by_hand = sum((rollout.logp[i, : int(n)] - rollout.ref_logp[i, : int(n)]).sum() for i, n in enumerate(lengths)) / len(rollout)
    torch.testing.assert_close(est.kl_to_reference(rollout), kl_by_hand)
    assert abs(kl_by_hand.item()) > 1e-3


def test_hand_built_rollout_masks_after_mid_sequence_eos(eos_lm):
    """On a rollout built by hand with EOS mid-sequence, post-EOS tokens score 0 and count in neither returns nor KL."""
    policy = policy_of(eos_lm, horizon=4)
    eos, pad = eos_lm.tokenizer.eos_token_id, eos_lm.tokenizer.pad_token_id
    words = eos_lm.tokenizer.convert_tokens_to_ids(["good", "dog", "sun", "rain"])
    tokens = torch.tensor([[words[0], eos, pad, pad], words, [eos, words[1], eos, words[2]]])
    mask = first_eos_mask(tokens, eos)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    prompt_ids, prompt_mask = policy.encode(["the dog is"] * 3)
    ctx = LMContext(torch.cat([prompt_ids, tokens], 1), torch.cat([prompt_mask, torch.ones_like(tokens)], 1), prompt_ids.shape[1], None)
    rollout = Rollout(["the dog is"] * 3, ["good", "good dog sun rain", ""], tokens, mask, torch.zeros(3, 4), torch.zeros(3, 4), torch.full((3,), 1 / 3), ctx)
    with policy.adapter(LAMBDA), torch.no_grad():
        taken = est.taken_log_probs(policy.log_probs(rollout), rollout)
    assert (taken[mask == 0] == 0).all() and (taken[mask == 1] < 0).all()
    rewards = torch.arange(12.0).reshape(3, 4) + 1
    torch.testing.assert_close(est.returns(rollout, rewards, 0.5), torch.tensor([1 + 0.5 * 2, 5 + 0.5 * 6 + 0.25 * 7 + 0.125 * 8, 9.0]))
    rollout.logp, rollout.ref_logp = taken, torch.where(mask.bool(), taken - 1, torch.full_like(taken, 5.0))
    assert est.kl_to_reference(rollout).item() == pytest.approx((2 + 4 + 1) / 3, abs=1e-5)


# -- 4. sequence log-probability and discounting by independent computations -----------------------
def test_sequence_log_prob_and_discounted_return_by_independent_computation(eos_lm):
    """Σ_h log π(a_h|s_h) equals an unpadded per-sequence forward (λ and π_ref), and returns equal a plain discounted loop."""
    perturb(lora_b(eos_lm, LAMBDA), 0.3, seed=5)
    policy = policy_of(eos_lm, horizon=5)
    rollout = policy.sample(PROMPTS * 2, torch.Generator().manual_seed(2))
    assert (rollout.mask == 0).any(), "the test needs a truncated sequence"
    with policy.adapter(LAMBDA), torch.no_grad():
        recomputed = est.taken_log_probs(policy.log_probs(rollout), rollout).sum(-1)
    fresh_base = eos_lm.independent()
    eos_lm.model.set_adapter(LAMBDA)
    for i in range(len(rollout)):
        response = rollout.tokens[i, : int(rollout.mask[i].sum())]
        lam = sequence_log_probs(eos_lm.model, real_prompt(rollout, i), response).sum()
        ref = sequence_log_probs(fresh_base, real_prompt(rollout, i), response).sum()
        assert rollout.logp[i].sum().item() == pytest.approx(lam.item(), abs=1e-4)
        assert recomputed[i].item() == pytest.approx(lam.item(), abs=1e-4)
        assert rollout.ref_logp[i].sum().item() == pytest.approx(ref.item(), abs=1e-4)
        assert abs(lam - ref) > 1e-2

    rewards = torch.rand(rollout.tokens.shape, generator=torch.Generator().manual_seed(3))
    by_loop = []
    for i in range(len(rollout)):
        total = 0.0
        for h in range(rollout.horizon):
            if rollout.mask[i, h] == 1:
                total += GAMMA**h * rewards[i, h].item()
        by_loop.append(total)
    torch.testing.assert_close(est.returns(rollout, rewards, GAMMA), torch.tensor(by_loop))


# -- 5. ∇_φ J against autograd on the enumerated expectation ---------------------------------------
def reward_head(dim: int, seed: int, policy: LMPolicy) -> TokenReward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # summed over tokens: the recursion of exact_expectation gives each state's reward its own term
        reward = TokenReward(policy.state_features, dim, RewardConfig(hidden=4, pool="sum"))
    perturb(reward.parameters(), 0.5, seed=seed)  # off the zero-initialised output layer: every φ matters
    return reward


def enumerated_rollout(policy: LMPolicy, prompt: str) -> Rollout:
    """Every distinct two-token trajectory of one prompt: (V−1)·V continuing ones and [EOS, pad]."""
    eos, pad, vocab = policy.eos, policy.pad, policy.vocab_size
    first = torch.tensor([a for a in range(vocab) if a != eos])
    tokens = torch.cat([torch.cartesian_prod(first, torch.arange(vocab)), torch.tensor([[eos, pad]])])
    mask = torch.ones(tokens.shape)
    mask[-1, 1] = 0
    prompt_ids, prompt_mask = policy.encode([prompt])
    n, prompt_len = len(tokens), prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids.expand(n, -1), tokens], 1)
    attention_mask = torch.cat([prompt_mask.expand(n, -1), torch.ones_like(tokens)], 1)
    with policy.adapter(None), torch.no_grad():  # as sample() does: one reference pass gives the features
        hidden = policy.trunk(input_ids, attention_mask)[:, prompt_len - 1 :]
    features = hidden.float()
    ref_logp = F.log_softmax(policy.head(hidden[:, :-1]).float(), -1).gather(-1, tokens[..., None]).squeeze(-1) * mask
    context = LMContext(input_ids, attention_mask, prompt_len, features)
    rollout = Rollout([prompt] * n, [None] * n, tokens, mask, torch.zeros(n, 2), ref_logp, torch.zeros(n), context)
    with policy.adapter(LAMBDA), torch.no_grad():
        rollout.logp = est.taken_log_probs(policy.log_probs(rollout), rollout)
    rollout.weight = rollout.logp.sum(-1).exp()  # the exact π_λ(τ)
    return rollout


@torch.no_grad()
def two_step_tables(lm: SimpleNamespace, fresh_base, prompt_ids: torch.Tensor) -> SimpleNamespace:
    """By forward passes of their own, unpadded: π(·|s₀) and π(·|s₀ ⊕ a₀) under λ and under the fresh base,
    and the base's features of s₀ ⊕ a₀ and s₀ ⊕ a₀ ⊕ a₁ for every a₀, a₁."""
    vocab = fresh_base.config.vocab_size
    one = torch.cat([prompt_ids.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)  # s₀ ⊕ a₀, one row per a₀
    two = torch.cat([one.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]], 1)
    lm.model.set_adapter(LAMBDA)
    probs = {}
    for name, logits in ((LAMBDA, lm.model(input_ids=one).logits), (None, fresh_base(input_ids=one).logits)):
        probs[name] = (F.softmax(logits[0, -2].float(), -1), F.softmax(logits[:, -1].float(), -1))
    f1 = fresh_base(input_ids=one, output_hidden_states=True).hidden_states[-1][:, -1]
    f2 = fresh_base(input_ids=two, output_hidden_states=True).hidden_states[-1][:, -1].reshape(vocab, vocab, -1)
    return SimpleNamespace(probs=probs, f1=f1, f2=f2)


def exact_expectation(tables: SimpleNamespace, adapter: str | None, reward: TokenReward, eos: int, gamma: float) -> torch.Tensor:
    """E_τ∼π Σ_h γ^h r_φ(s_h, a_h) for H = 2 by the recursion Σ_a₀ π(a₀)[r(s₁) + γ·1[a₀ ≠ EOS] Σ_a₁ π(a₁|s₁) r(s₂)]."""
    p0, p1 = tables.probs[adapter]
    r1, r2 = reward.state_rewards(tables.f1).mean(0), reward.state_rewards(tables.f2).mean(0)
    continues = torch.ones_like(p0)
    continues[eos] = 0.0
    return (p0 * (r1 + gamma * continues * (p1 * r2).sum(-1))).sum()


@pytest.fixture(scope="module")
def enumerated(sharp_module):
    """λ moved far from π_ref on the sharpened model (used by no other test), all V² trajectories of one prompt."""
    lm = sharp_module
    perturb(lora_b(lm, LAMBDA), 0.3, seed=7)
    policy = policy_of(lm, horizon=2)
    rollout = enumerated_rollout(policy, "the dog is")
    reward = reward_head(policy.feature_dim, seed=11, policy=policy)
    prompt_ids, _ = policy.encode(["the dog is"])
    tables = two_step_tables(lm, lm.independent(), prompt_ids)
    phi = reward.parameters()

    def exact(adapter):
        value = exact_expectation(tables, adapter, reward, policy.eos, GAMMA)
        return value, flat(torch.autograd.grad(value, phi))

    return SimpleNamespace(policy=policy, rollout=rollout, reward=reward, phi=phi, exact=exact, tables=tables)


def test_grad_J_phi_on_enumerated_rollout_equals_autograd_of_exact_expectation(enumerated):
    """grad_J_phi with weights π_λ(τ) over all V² trajectories equals autograd of the recursion's exact E[Σγ^h r_φ]."""
    rollout, reward, phi = enumerated.rollout, enumerated.reward, enumerated.phi
    assert rollout.weight.sum().item() == pytest.approx(1.0, abs=1e-4)
    value, exact = enumerated.exact(LAMBDA)
    rewards = reward.token_rewards(rollout)
    assert (rollout.weight * est.returns(rollout, rewards, GAMMA)).sum().item() == pytest.approx(value.item(), rel=1e-4)
    grad = flat(est.grad_J_phi([rewards], phi, [rollout], GAMMA))
    torch.testing.assert_close(grad, exact, rtol=1e-4, atol=1e-6)
    _, under_ref = enumerated.exact(None)
    assert (exact - under_ref).norm() > 100 * (grad - exact).norm(), "λ is too close to π_ref for the test to tell them apart"
    undiscounted = flat(est.grad_J_phi([reward.token_rewards(rollout)], phi, [rollout], 1.0))
    assert (undiscounted - exact).norm() > 100 * (grad - exact).norm()


def test_sampled_grad_J_phi_agrees_with_exact_within_standard_errors(enumerated):
    """The Monte-Carlo ∇_φ J from N sampled rollouts lies within 4 standard errors of the exact one, which π_ref's does not."""
    policy, reward, phi = enumerated.policy, enumerated.reward, enumerated.phi
    _, exact = enumerated.exact(LAMBDA)
    _, under_ref = enumerated.exact(None)
    n = 768
    rollout = policy.sample(["the dog is"] * n, torch.Generator().manual_seed(0))
    rewards = reward.token_rewards(rollout)
    estimate = flat(est.grad_J_phi([reward.token_rewards(rollout)], phi, [rollout], GAMMA))
    per_trajectory = est.returns(rollout, rewards, GAMMA)
    samples = torch.cat(
        [g.reshape(n, -1) for g in torch.autograd.grad(per_trajectory, phi, torch.eye(n), is_grads_batched=True)], 1
    )
    torch.testing.assert_close(estimate, samples.mean(0), rtol=1e-4, atol=1e-6)
    generator = torch.Generator().manual_seed(1)
    directions = [(exact - under_ref) / (exact - under_ref).norm()]
    directions += [u / u.norm() for u in torch.randn(3, exact.numel(), generator=generator)]
    for k, u in enumerate(directions):
        projected = samples @ u
        mean, se = projected.mean().item(), projected.std().item() / math.sqrt(n)
        assert abs(mean - (exact @ u).item()) < 4 * se, f"direction {k}: estimate {mean:.5f} ± {se:.5f} vs exact {(exact @ u).item():.5f}"
        if k == 0:  # sampling from π_ref instead of π_λ would be caught
            assert abs(((exact - under_ref) @ u).item()) > 8 * se


# -- 6. the heads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("center, low", [(True, -0.5), (False, 0.0)])
def test_token_reward_in_its_interval_zero_after_eos_and_differentiable_in_phi_only(eos_lm, center, low):
    """r_φ ∈ (−1/2, 1/2) centred, (0, 1) not, before EOS and 0 after, reads s_{h+1}'s features, and has gradient in φ but none in the LoRA weights."""
    perturb(lora_b(eos_lm, LAMBDA), 0.3, seed=1)
    policy = policy_of(eos_lm, horizon=6)
    rollout = policy.sample(PROMPTS * 4, torch.Generator().manual_seed(0))
    assert (rollout.mask == 0).any()
    for hidden in (0, 4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hidden)
            reward = TokenReward(policy.state_features, policy.feature_dim, RewardConfig(hidden=hidden, center=center, pool="sum"))
        perturb(reward.parameters(), 0.5, seed=hidden)  # off the zero-initialised output layer: every φ matters
        rewards = reward.token_rewards(rollout)
        assert rewards.shape == rollout.tokens.shape
        on = rollout.mask == 1
        assert ((rewards[on] > low) & (rewards[on] < low + 1)).all() and (rewards[~on] == 0).all()
        by_hand = torch.sigmoid(reward.net(rollout.context.features[:, 1:])).squeeze(-1) + low
        torch.testing.assert_close(rewards[on], by_hand[on])
        grads = torch.autograd.grad(rewards.sum(), reward.parameters(), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)
        lora = policy.parameters_of(LAMBDA) + policy.parameters_of(LAMBDA_PRIME)
        flags = [p.requires_grad for p in lora]
        try:  # ask autograd even about adapters that set_adapter froze
            for p in lora:
                p.requires_grad_(True)
            assert lora and all(g is None for g in torch.autograd.grad(rewards.sum(), lora, allow_unused=True))
        finally:
            for p, flag in zip(lora, flags):
                p.requires_grad_(flag)
    assert not rollout.context.features.requires_grad


def test_state_features_are_the_base_hidden_states_of_each_prefix(eos_lm):
    """state_features[:, h] is the reference model's last hidden state at the end of s_h = prompt ⊕ a_<h, for every adapter."""
    perturb(lora_b(eos_lm, LAMBDA), 0.3, seed=1)
    policy = policy_of(eos_lm, horizon=4)
    rollout = policy.sample(PROMPTS + PROMPTS[:2], torch.Generator().manual_seed(3))  # rows sharing a prompt too
    features = policy.state_features(rollout)
    assert features.shape == (6, 5, policy.feature_dim)
    fresh_base = eos_lm.independent()
    for i in range(len(rollout)):
        prompt = real_prompt(rollout, i)
        for h in range(int(rollout.mask[i].sum()) + 1):
            ids = torch.cat([prompt, rollout.tokens[i, :h]])[None]
            with torch.no_grad():
                direct = fresh_base(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(features[i, h], direct, atol=1e-5, rtol=1e-4)


def test_vocab_q_head_shape_and_initial_value_broadcast(lm):
    """VocabQHead gives [N, H, V]; at init Q(s, ·) = v(s) for every token, and once U ≠ 0 it adds ⟨e_a, U h(s)⟩."""
    policy = policy_of(lm, horizon=3)
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    embedding = lm.model.get_output_embeddings().weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = VocabQHead(embedding, policy.feature_dim)
    d = policy.feature_dim
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == d * d + d + 1
    seen = {}  # what v(·) and U(·) output inside the head, whatever it does to the features first
    head.value.register_forward_hook(lambda module, args, out: seen.__setitem__("value", out))
    head.mix.register_forward_hook(lambda module, args, out: seen.__setitem__("mixed", out))
    states = policy.state_features(rollout)[:, : rollout.horizon]
    q = head(states)
    assert q.shape == (4, 3, policy.vocab_size)
    assert seen["value"].shape == (4, 3, 1) and seen["value"].std() > 0
    torch.testing.assert_close(q, seen["value"].expand_as(q), atol=0, rtol=0)
    with torch.no_grad():
        head.mix.weight.normal_(generator=torch.Generator().manual_seed(1))
    q = head(states)
    assert (q - q.mean(-1, keepdim=True)).abs().max() > 1e-2
    torch.testing.assert_close(q, seen["value"] + seen["mixed"] @ embedding.T)
    actions = rollout.tokens
    torch.testing.assert_close(head(states, actions), q.gather(-1, actions[..., None]).squeeze(-1))
    probs = torch.softmax(3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(2)), -1)
    torch.testing.assert_close(head.expectation(states, head.summarise(probs)), (probs * q).sum(-1))


def test_vocab_q_head_neither_owns_nor_moves_the_base_embedding(lm):
    """The Q head's parameters and state_dict exclude the LM embedding, and a TD fit leaves the base (π_ref) bit-identical."""
    policy = policy_of(lm, horizon=3)
    rollout = policy.sample(PROMPTS * 2, torch.Generator().manual_seed(0))
    embedding = lm.model.get_output_embeddings().weight
    before = embedding.detach().clone()
    head = VocabQHead(embedding, policy.feature_dim)
    critic = TDCritic(policy.state_features, head, GAMMA, CriticConfig(blocks=1, target_every=10, batch_size=16), torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_probs = policy.log_probs(rollout)
    critic.fit(rollout, torch.rand(rollout.tokens.shape, generator=torch.Generator().manual_seed(1)) * rollout.mask, log_probs)
    changed = (embedding.detach() != before).sum().item()
    with torch.no_grad():
        embedding.copy_(before)  # undo the drift for the other tests
    assert changed == 0, f"TD fit changed {changed} entries of the frozen base embedding"
    assert "embedding" not in head.state_dict()
    assert not any(p is embedding for p in head.parameters())


# -- 7. prompt encoding ---------------------------------------------------------------------------
def test_chat_template_is_applied_only_when_asked_and_present(lm):
    """encode wraps prompts in the tokenizer's chat template when chat_template=True and it has one, else not."""
    plain = tiny.tokenizer()
    templated = tiny.tokenizer()
    templated.chat_template = (
        "{% for m in messages %}tell {{ m['content'] }} share{% endfor %}{% if add_generation_prompt %} write{% endif %}"
    )
    ids = {w: plain.convert_tokens_to_ids(w) for w in ("tell", "share", "write", "the", "dog")}
    cfg = RolloutConfig(max_new_tokens=3)
    with_template = LMPolicy(lm.model, templated, cfg, chat_template=True)
    input_ids, attention = with_template.encode(["the dog"])
    assert input_ids[0].tolist() == [ids[w] for w in ("tell", "the", "dog", "share", "write")]
    assert attention.sum().item() == 5
    for policy in (
        LMPolicy(lm.model, templated, cfg, chat_template=False),
        LMPolicy(lm.model, plain, cfg, chat_template=True),  # no template to apply
    ):
        input_ids, _ = policy.encode(["the dog"])
        assert input_ids[0].tolist() == [ids["the"], ids["dog"]]
    rollout = with_template.sample(["the dog", "a"], torch.Generator().manual_seed(0))
    assert rollout.context.prompt_len == 5
    assert rollout.context.input_ids[1, :5].tolist() == [plain.pad_token_id, ids["tell"], plain.convert_tokens_to_ids("a"), ids["share"], ids["write"]]


def test_encode_left_pads_and_cuts_long_prompts_from_the_left(lm):
    """Prompts are left-padded to a common length and those over max_prompt_tokens keep their end."""
    policy = policy_of(lm, horizon=2, max_prompt_tokens=3)
    input_ids, attention = policy.encode(["a good day for a walk", "dog"])
    words = lm.tokenizer.convert_tokens_to_ids(["for", "a", "walk", "dog"])
    assert input_ids.tolist() == [words[:3], [lm.tokenizer.pad_token_id] * 2 + [words[3]]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampling_ignores_the_model_generation_defaults(lm):
    """Sampling follows π_λ even when the model ships generation defaults (here suppress_tokens) that would distort it."""
    eos = lm.tokenizer.eos_token_id
    lm.base.generation_config.suppress_tokens = [t for t in range(len(lm.tokenizer)) if t != eos]
    try:
        rollout = policy_of(lm, horizon=3).sample(PROMPTS * 4, torch.Generator().manual_seed(0))
    finally:
        lm.base.generation_config.suppress_tokens = None
    # π(EOS) ≈ 1/192 on the tiny model, so 16 first tokens all EOS has probability ≈ 1e-36
    assert (rollout.tokens[:, 0] != eos).sum() > 8


# -- 8. d'_k in one backward pass ------------------------------------------------------------------
def test_lambda_prime_direction_of_one_backward_equals_grad_J_minus_sigma_grad_f(eos_lm):
    """`PolicyAscent.direction` with a penalty takes ∇(Ĵ − σ f̂) in one backward pass: the same as eq. 12 and
    eq. 17 each by its own backward, combined as docs/algorithm.md step 4 says."""
    from rlhf_bilevel.bilevel import Bilevel
    from rlhf_bilevel.config import BilevelConfig
    from rlhf_bilevel.critic import MCCritic
    from rlhf_bilevel.labelling import Labeller
    from rlhf_bilevel.sampling import consecutive_pairs

    perturb(lora_b(eos_lm, LAMBDA_PRIME), 0.3, seed=8)
    policy = policy_of(eos_lm, horizon=4)
    reward = reward_head(policy.feature_dim, 8, policy)
    cfg = BilevelConfig(sigma=0.3, critic=CriticConfig(kind="mc"))
    bilevel = Bilevel(policy, reward, None, Labeller(None), lambda name: MCCritic(cfg.gamma), cfg, torch.Generator())
    with policy.adapter(LAMBDA_PRIME):
        pairs = consecutive_pairs(policy.sample([p for p in PROMPTS for _ in range(2)], torch.Generator().manual_seed(8)))
    label = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        losses = est.upper_loss(est.pair_margins(reward.token_rewards(pairs.rollout), pairs), label, "bt_nll")
    direction, _ = bilevel.ascent.direction(LAMBDA_PRIME, pairs.rollout, lambda log_probs: est.surrogate_f_lambda(log_probs, pairs, losses))

    params = policy.parameters_of(LAMBDA_PRIME)
    with torch.no_grad():
        shaped = est.shaped_rewards(pairs.rollout, reward.token_rewards(pairs.rollout), cfg.beta)
    with policy.adapter(LAMBDA_PRIME):
        log_probs = policy.log_probs(pairs.rollout)
    advantage = bilevel.critics[LAMBDA_PRIME].advantages(pairs.rollout, shaped, log_probs)
    grad_J = est.grad_J_lambda(log_probs, params, pairs.rollout, advantage, cfg.gamma)
    grad_f = est.grad_f_lambda(log_probs, params, pairs, losses)
    assert flat(grad_f).abs().max() > 1e-3  # the penalty term is there to be lost
    torch.testing.assert_close(flat(direction), flat(grad_J) - cfg.sigma * flat(grad_f), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, native, expected):
    # on a CPU without avx512_bf16 every bf16 matmul is emulated, several times slower than float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    base, _ = load_base(ModelConfig(name="tiny", dtype="auto"))
    assert base.get_input_embeddings().weight.dtype == expected
    assert load_base(ModelConfig(name="tiny", dtype="bfloat16"))[0].dtype == torch.bfloat16  # a named dtype is kept


def test_the_policy_cuts_and_pads_prompts_on_the_left_of_its_own_tokenizer():
    lm = make_lm()
    lm.tokenizer.padding_side = lm.tokenizer.truncation_side = "right"
    policy = LMPolicy(lm.model, lm.tokenizer, RolloutConfig(max_new_tokens=2, max_prompt_tokens=3), chat_template=False)
    ids, mask = policy.encode(["the dog is very happy", "tell me"])
    assert lm.tokenizer.padding_side == lm.tokenizer.truncation_side == "right"  # the caller's, as it was
    words = lm.tokenizer(["is very happy", "tell me"])["input_ids"]
    assert ids[0].tolist() == words[0] and ids[1, 1:].tolist() == words[1] and mask[1].tolist() == [0, 1, 1]
