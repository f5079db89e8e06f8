"""The neural parts of the exact testbed: a softmax MLP policy with two adapters over a frozen
base, a sigmoid MLP reward, and the hidden gold reward behind a Bradley–Terry oracle.

They satisfy the protocols of `types.py`, so Algorithm 1 runs on them unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_bilevel.exact.tree import TokenTree
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.seeding import linear
from rlhf_bilevel.types import ADAPTERS, AdapterSwitch, Rollout


def mlp(inputs: int, hidden: int, outputs: int, generator: torch.Generator) -> nn.Sequential:
    return nn.Sequential(linear(inputs, hidden, generator), nn.Tanh(), linear(hidden, outputs, generator))


class ExactPolicy(AdapterSwitch, nn.Module):
    """π(·|s) = softmax(base(s) + adapter(s)); the base alone is π_ref.

    The adapter reads the prefix encoding and a one-hot of the node, so it can represent
    any policy (the over-parameterised regime of the paper's assumptions); its output
    layer starts at zero, as a LoRA adapter does, so λ and λ′ start at π_ref. Its weights are drawn
    from `generator`: the base, then each adapter.
    """

    def __init__(self, tree: TokenTree, generator: torch.Generator, hidden: int = 32, ref_scale: float = 1.0):
        super().__init__()
        self.tree = tree
        self.inputs = torch.cat([tree.features, torch.eye(tree.num_nodes)], dim=1)
        self.base = mlp(tree.features.shape[1], hidden, tree.vocab, generator).requires_grad_(False)
        with torch.no_grad():
            self.base[-1].weight.mul_(ref_scale * 4)
        self.adapters = nn.ModuleDict({name: mlp(self.inputs.shape[1], hidden, tree.vocab, generator) for name in ADAPTERS})
        nn.init.zeros_(self.adapters[ADAPTERS[0]][-1].weight)
        nn.init.zeros_(self.adapters[ADAPTERS[0]][-1].bias)
        for name in ADAPTERS[1:]:  # λ′_0 = λ_0: both start from the same point
            self.adapters[name].load_state_dict(self.adapters[ADAPTERS[0]].state_dict())
        self.active: str | None = ADAPTERS[0]

    def parameters_of(self, name: str) -> list[Tensor]:
        return list(self.adapters[name].parameters())

    def table(self) -> Tensor:
        """[S, V] log π(·|s) for every state, under the active adapter."""
        nodes = self.tree.state_nodes
        logits = self.base(self.tree.features[nodes])
        if self.active is not None:
            logits = logits + self.adapters[self.active](self.inputs[nodes])
        return F.log_softmax(logits, dim=-1)

    def log_probs(self, rollout: Rollout) -> Tensor:
        return self.table()[self.tree.path_states(rollout.context)]

    def state_features(self, rollout: Rollout) -> Tensor:
        return self.inputs[rollout.context]

    @torch.no_grad()
    def sample(self, prompts: Sequence[int], generator: torch.Generator) -> Rollout:
        """By inverse CDF from uniforms drawn up front, as LMPolicy samples: two adapters fed the
        same generator state draw coupled trajectories (common random numbers), each row taking
        the same token wherever the two policies' CDFs agree."""
        tree = self.tree
        n, horizon = len(prompts), tree.horizon
        uniforms = torch.rand(n, horizon, generator=generator, dtype=torch.float64)
        table = self.table()
        with self.adapter(None):
            ref_table = self.table()
        node = tree.roots[torch.tensor(list(prompts), dtype=torch.long)]
        path = [node]
        tokens = torch.zeros(n, horizon, dtype=torch.long)
        mask = torch.zeros(n, horizon)
        alive = torch.ones(n, dtype=torch.bool)
        for h in range(horizon):
            state = tree.state_of_node[node].clamp(min=0)
            action = inverse_cdf(table[state].exp(), uniforms[:, h])
            tokens[:, h] = torch.where(alive, action, 0)
            mask[:, h] = alive.float()
            nxt = tree.child[state, action]
            node = torch.where(alive, nxt, node)
            alive = alive & ~tree.child_terminal[state, action]
            path.append(node)
        return self.rollout(list(prompts), tokens, mask, torch.stack(path, 1), table, ref_table, torch.full((n,), 1.0 / n))

    def rollout(self, prompts, tokens, mask, path, table, ref_table, weight) -> Rollout:
        states = self.tree.path_states(path)
        taken = tokens.unsqueeze(-1)
        return Rollout(
            prompts=prompts,
            responses=[tuple(t[:length]) for t, length in zip(tokens.tolist(), mask.sum(-1).long().tolist())],
            tokens=tokens,
            mask=mask,
            logp=table[states].gather(-1, taken).squeeze(-1).detach() * mask,
            ref_logp=ref_table[states].gather(-1, taken).squeeze(-1).detach() * mask,
            weight=weight,
            context=path,
            adapter=self.active,
        )


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token k of each row where cdf(k − 1) ≤ u·cdf(V) < cdf(k): probability π(k) exactly."""
    cdf = probs.to(torch.float64).cumsum(-1)
    action = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return action.clamp(max=probs.shape[-1] - 1)  # u·cdf(V) rounding onto cdf(V) itself


class ExactReward(nn.Module):
    """r_φ(s, a) = sigmoid(MLP(features of s ⊕ a)) ∈ [0, 1].

    It reads only the prefix encoding (through a narrow hidden layer, or none when
    `hidden` is 0: a logistic unit), so it cannot fit the gold
    reward everywhere: where the policy puts its mass decides what it fits — the
    distribution shift the bilevel method is about.
    """

    def __init__(self, tree: TokenTree, hidden: int = 4, seed: int = 0):
        super().__init__()
        self.tree = tree
        generator = torch.Generator().manual_seed(seed)
        inputs = tree.last_token_features.shape[1]
        self.net = mlp(inputs, hidden, 1, generator) if hidden else linear(inputs, 1, generator)

    def parameters(self, recurse: bool = True) -> list[Tensor]:  # the protocol wants a list
        return list(super().parameters(recurse))

    def node_rewards(self) -> Tensor:
        """[nodes] r_φ for the action that led into each node."""
        return torch.sigmoid(self.net(self.tree.last_token_features)).squeeze(-1)

    def token_rewards(self, rollout: Rollout) -> Tensor:
        return self.node_rewards()[rollout.context[:, 1:]] * rollout.mask

    def member_rewards(self, rollout: Rollout) -> Tensor:
        return self.token_rewards(rollout).unsqueeze(0)  # one member: the testbed has no ensemble


class GoldOracle:
    """Bradley–Terry on a hidden gold reward: P(τ0 ≻ τ1) = sigmoid((R*(τ0) − R*(τ1)) / temperature)."""

    name = "gold"
    offers = Offers.COMPARISON  # the lab reads the gold reward itself (`gold_return`), not through a labeller
    positional = False

    def __init__(self, tree: TokenTree, temperature: float = 0.5, hidden: int = 16, seed: int = 1):
        self.tree = tree
        self.temperature = temperature
        generator = torch.Generator().manual_seed(seed)
        w1 = torch.randn(tree.features.shape[1], hidden, generator=generator)
        w2 = torch.randn(hidden, generator=generator) / hidden**0.5
        self.node_gold = torch.sigmoid(2 * torch.tanh(tree.features @ w1) @ w2)
        path_rewards = self.node_gold[tree.leaf_path[:, 1:]] * tree.leaf_mask
        self.leaf_gold = path_rewards.sum(-1)

    def gold_return(self, prompts: Sequence[int], responses: Sequence[tuple[int, ...]]) -> Tensor:
        leaves = [self.tree.leaf_of[(p, y)] for p, y in zip(prompts, responses)]
        return self.leaf_gold[torch.tensor(leaves, dtype=torch.long)]  # a tensor index: a list of ints is parsed one by one

    def compare(self, prompts: Sequence[int], first: Sequence[tuple], second: Sequence[tuple]) -> Tensor:
        margin = self.gold_return(prompts, first) - self.gold_return(prompts, second)
        return torch.sigmoid(margin / self.temperature)
