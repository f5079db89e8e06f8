"""The reward head's forms (`RewardConfig`): centring, pooling, the layer it reads, and the ensemble.

The forms are checked on hand-made features where only the head matters, and the layer on the
tiny random Llama against a plain forward pass of the base.
"""

from pathlib import Path

import pytest
import torch

from conftest import perturb, run_cli
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.lm.heads import REWARD_ADAPTER, RewardConfig, TokenReward
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy, RolloutConfig
from rlhf_bilevel.recipe import parse_recipe, recipe_dict
from rlhf_bilevel.types import LAMBDA, Rollout

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HORIZON = 8, 5
LENGTHS = [5, 2, 1, 4]  # tokens up to and including EOS, per row
PROMPTS = ["the dog is", "a good day for a walk", "tell me", "my neighbour said the weather was"]
TINY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-debug.yaml"


def features_rollout() -> Rollout:
    """Rows of LENGTHS tokens whose context is the features a head reads, [N, H + 1, DIM]."""
    n = len(LENGTHS)
    mask = (torch.arange(HORIZON) < torch.tensor(LENGTHS)[:, None]).float()
    zeros = torch.zeros_like(mask)
    features = torch.randn(n, HORIZON + 1, DIM, generator=torch.Generator().manual_seed(0))
    return Rollout([""] * n, [""] * n, zeros.long(), mask, zeros, zeros, torch.full((n,), 1 / n), features)


def head(seed: int = 0, **fields) -> TokenReward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TokenReward(lambda rollout: rollout.context, DIM, RewardConfig(**fields))


@pytest.mark.parametrize("hidden", [0, 3])
@pytest.mark.parametrize("heads", [1, 4, 5])
@pytest.mark.parametrize("center, neutral", [(True, 0.0), (False, 0.5)])
def test_an_untrained_head_gives_the_neutral_reward_on_every_token(hidden, heads, center, neutral):
    """Before any label r_φ is exactly 0 on every token when centred, and 0 after EOS, whatever the
    ensemble's size: mirrored members cancel exactly. Uncentred it is 1/2 (up to rounding: the
    sigmoid's values at ±z sum to 1 only up to rounding)."""
    rollout = features_rollout()
    rewards = head(hidden=hidden, heads=heads, center=center).token_rewards(rollout)
    torch.testing.assert_close(rewards, neutral * rollout.mask, atol=0 if center else 1e-7, rtol=0)


def test_mean_pooling_divides_each_token_by_the_length():
    """pool: mean is pool: sum over the response's length, so R_φ(τ) = Σ_h r_φ is the mean over its tokens."""
    rollout = features_rollout()
    summed, averaged = head(pool="sum"), head(pool="mean")
    perturb(summed.parameters(), 1.0, seed=1)
    averaged.load_state_dict(summed.state_dict())
    lengths = torch.tensor(LENGTHS, dtype=torch.float32)
    per_token = summed.token_rewards(rollout)
    assert (per_token[rollout.mask == 1] != 0).all()
    torch.testing.assert_close(averaged.token_rewards(rollout), per_token / lengths[:, None])
    torch.testing.assert_close(averaged.token_rewards(rollout).sum(-1), per_token.sum(-1) / lengths)


@pytest.mark.parametrize("hidden", [0, 3])
def test_the_ensemble_is_the_mean_of_members_that_differ_from_the_start(hidden):
    """member_rewards [E, N, H] holds E different rewards from the start (and other ones from another seed);
    token_rewards is their mean, at init and after a gradient step on it."""
    rollout = features_rollout()
    reward = head(hidden=hidden, heads=4)
    members = reward.member_rewards(rollout)
    assert members.shape == (4, len(LENGTHS), HORIZON)
    on = rollout.mask == 1
    for a in range(4):
        for b in range(a):
            assert (members[a][on] != members[b][on]).all()
    assert (members[:, ~on] == 0).all()
    assert not torch.equal(head(seed=1, hidden=hidden, heads=4).member_rewards(rollout), members)
    reward.token_rewards(rollout).sum().backward()
    with torch.no_grad():
        for p in reward.parameters():
            p += p.grad
    moved = reward.member_rewards(rollout)
    assert (moved.mean(0)[on] != 0).all()
    torch.testing.assert_close(reward.token_rewards(rollout), moved.mean(0), atol=0, rtol=0)


@pytest.mark.parametrize("hidden, output", [(0, "net.1"), (3, "net.3")])
def test_one_head_starts_at_zero_and_is_saved_as_before_ensembles(hidden, output):
    """heads: 1 keeps the zero-initialised output layer, and the names and shapes of the weights that
    checkpoints made before ensembles hold."""
    state = head(hidden=hidden).state_dict()
    shapes = {f"{output}.weight": (1, hidden or DIM), f"{output}.bias": (1,)}
    if hidden:
        shapes |= {"net.1.weight": (hidden, DIM), "net.1.bias": (hidden,)}
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert not state[f"{output}.weight"].any() and not state[f"{output}.bias"].any()


# -- the layer the head reads, on the tiny Llama ---------------------------------------------------
@pytest.fixture
def policy():
    """A fresh tiny model with λ moved away from the base: features must be the base's all the same."""
    base, tokenizer = load_base(ModelConfig(name="tiny"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = with_adapters(base, AdapterConfig(r=4, alpha=8), extra=(REWARD_ADAPTER,))
    lora_b = [p for name, p in model.named_parameters() if f".lora_B.{LAMBDA}." in name]
    perturb(lora_b, 0.3, seed=1)
    return LMPolicy(model, tokenizer, RolloutConfig(max_new_tokens=4), chat_template=False)


def assert_base_hidden_states(features: torch.Tensor, rollout: Rollout, layer: int) -> None:
    """features[i, h] is hidden_states[layer] of a plain forward pass of the base, unpadded, at the last
    token of s_h = prompt ⊕ a_<h, for every state up to the response's end."""
    base = tiny.build()[0].eval()  # what load_base(tiny) loads, never wrapped by peft
    ctx = rollout.context
    for i in range(len(rollout)):
        prompt = ctx.input_ids[i, : ctx.prompt_len][ctx.attention_mask[i, : ctx.prompt_len] == 1]
        length = int(rollout.mask[i].sum())
        with torch.no_grad():
            states = base(input_ids=torch.cat([prompt, rollout.tokens[i, :length]])[None], output_hidden_states=True).hidden_states
        torch.testing.assert_close(features[i, : length + 1], states[layer][0, len(prompt) - 1 :], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_the_reward_reads_the_base_hidden_states_of_its_layer(policy, layer):
    """reward.layer k: the features of every state s_0 … s_H are hidden_states[k] of the base (adapters off),
    kept by the reference pass of sampling, and the reward is the head on them."""
    reward = TokenReward.on(policy, RewardConfig(layer=layer))
    perturb(reward.parameters(), 1.0, seed=2)
    rollout = policy.sample(PROMPTS * 2, torch.Generator().manual_seed(0))  # rows sharing a prompt too
    features = policy.reward_features(rollout)
    assert features.shape == (8, 5, policy.feature_dim) and not features.requires_grad
    assert_base_hidden_states(features, rollout, layer)
    assert not torch.allclose(features, policy.state_features(rollout))
    by_hand = (torch.sigmoid(reward.net(features[:, 1:]).squeeze(-1)) - 0.5) * rollout.mask
    torch.testing.assert_close(reward.token_rewards(rollout), by_hand)
    torch.testing.assert_close(rollout.rows(slice(2, 5)).context.reward_features, rollout.context.reward_features[2:5])


@pytest.mark.parametrize("layer", [None, 2])
def test_the_last_layer_is_read_from_the_features_the_critic_reads(policy, layer):
    """reward.layer None and the number of layers both mean the last hidden state: no second copy is kept."""
    TokenReward.on(policy, RewardConfig(layer=layer))
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert policy.reward_layer is None and rollout.context.reward_features is None
    assert policy.reward_features(rollout) is policy.state_features(rollout)


def test_a_reward_with_its_own_lora_reads_its_layer_and_trains_the_adapter_below_it(policy):
    """With reward.lora the features of layer k come from the reward adapter (the base while it is zero), and φ's
    trunk is that adapter's weights in the k decoder layers below: each gets a gradient, none is left unused."""
    reward = TokenReward.on(policy, RewardConfig(layer=1, lora=True))
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert_base_hidden_states(reward.features(rollout).detach(), rollout, layer=1)
    below = policy.parameters_of(REWARD_ADAPTER, below_layer=1)
    assert below and len(below) < len(policy.parameters_of(REWARD_ADAPTER))
    assert reward.trunk == below
    perturb(reward.parameters(), 0.3, seed=3)
    grads = torch.autograd.grad(reward.token_rewards(rollout).sum(), reward.parameters())
    assert all(g.abs().sum() > 0 for g in grads)


# -- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [("reward.heads=0", "reward.heads: must be > 0"), ("reward.pool=max", "reward.pool:"), ("reward.layer=-1", "reward.layer:")],
)
def test_a_bad_reward_field_is_a_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as error:
        parse_recipe({"prompts": {"train": "prompts.jsonl"}}, [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_resolved_recipe_with_the_reward_defaults_loads_again():
    """A run folder keeps its resolved recipe, which eval and resume parse again: each default of the
    reward section must be a value that a recipe accepts."""
    recipe = parse_recipe({"prompts": {"train": "prompts.jsonl"}})
    assert parse_recipe(recipe_dict(recipe)).reward == recipe.reward


@pytest.mark.parametrize("layer", [3, -1])
def test_a_layer_the_model_does_not_have_is_a_config_error_naming_it(policy, layer):
    with pytest.raises(ConfigError, match=rf"^reward\.layer: .* 0 \(the embeddings\) to 2 .*got {layer}$"):
        TokenReward.on(policy, RewardConfig(layer=layer))


def test_the_cli_rejects_a_layer_out_of_range_in_one_line_before_writing(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--recipe", str(TINY_RECIPE), "--output-dir", str(out), "--set", "reward.layer=3", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "reward.layer" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
