"""The token MDP as an enumerated tree: every prefix of every prompt, small enough to list.

Token 0 is EOS. A node is a prompt plus a response prefix; it is terminal when the
prefix ends in EOS or has H tokens (absorbing: no reward or log-probability after it).
The non-terminal nodes are the MDP's states; the terminal ones end the trajectories.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import torch
from torch import Tensor

EOS = 0
MAX_TRAJECTORIES = 1500  # per prompt: pairs grow as its square in the exact upper loss


class TreeError(ValueError):
    pass


class TokenTree:
    def __init__(self, prompts: int, vocab: int, horizon: int):
        if prompts < 1:
            raise TreeError(f"prompts: must be ≥ 1, got {prompts}")
        if not 2 <= vocab <= 8:
            raise TreeError(f"vocab: must be between 2 and 8 (token 0 is EOS), got {vocab}")
        if horizon < 1:
            raise TreeError(f"horizon: must be ≥ 1, got {horizon}")
        per_prompt = sum((vocab - 1) ** h for h in range(horizon)) + (vocab - 1) ** horizon
        if per_prompt > MAX_TRAJECTORIES:
            raise TreeError(
                f"vocab={vocab}, horizon={horizon}: {per_prompt} trajectories per prompt, more than the "
                f"{MAX_TRAJECTORIES} exact enumeration allows; lower vocab or horizon"
            )
        self.prompts, self.vocab, self.horizon = prompts, vocab, horizon
        nodes = [
            (p, prefix)
            for p in range(prompts)
            for length in range(horizon + 1)
            for prefix in itertools.product(range(vocab), repeat=length)
            if EOS not in prefix[:-1]
        ]
        self.nodes = nodes
        self.node_index = {node: i for i, node in enumerate(nodes)}
        terminal = [len(y) == horizon or (len(y) > 0 and y[-1] == EOS) for _, y in nodes]
        self.state_nodes = torch.tensor([i for i, t in enumerate(terminal) if not t])
        self.leaf_nodes = torch.tensor([i for i, t in enumerate(terminal) if t])
        self.state_of_node = torch.full((len(nodes),), -1, dtype=torch.long)
        self.state_of_node[self.state_nodes] = torch.arange(len(self.state_nodes))
        self.depth = torch.tensor([len(y) for _, y in nodes])
        # the states of each depth h, for backward induction over the horizon
        self.states_at_depth = [(self.depth[self.state_nodes] == h).nonzero().squeeze(-1) for h in range(horizon)]
        self.node_prompt = torch.tensor([p for p, _ in nodes])
        self.roots = torch.tensor([self.node_index[(p, ())] for p in range(prompts)])
        # child[s, a]: the node s ⊕ a
        self.child = torch.tensor(
            [[self.node_index[(nodes[n][0], nodes[n][1] + (a,))] for a in range(vocab)] for n in self.state_nodes.tolist()]
        )
        self.child_terminal = torch.tensor(terminal)[self.child]
        self.features = self._prefix_features()
        self.last_token_features = self._last_token_features()
        self._index_leaves()

    @property
    def num_states(self) -> int:
        return len(self.state_nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def _prefix_features(self) -> Tensor:
        """One-hot prompt, then one one-hot block per position (zeros where not yet generated)."""
        feats = torch.zeros(self.num_nodes, self.prompts + self.horizon * self.vocab)
        for i, (p, y) in enumerate(self.nodes):
            feats[i, p] = 1.0
            for h, a in enumerate(y):
                feats[i, self.prompts + h * self.vocab + a] = 1.0
        return feats

    def _last_token_features(self) -> Tensor:
        """One-hot prompt, and one-hot (position, token) of the node's last token only."""
        feats = torch.zeros(self.num_nodes, self.prompts + self.horizon * self.vocab)
        for i, (p, y) in enumerate(self.nodes):
            feats[i, p] = 1.0
            if y:
                feats[i, self.prompts + (len(y) - 1) * self.vocab + y[-1]] = 1.0
        return feats

    def _index_leaves(self) -> None:
        n, horizon = len(self.leaf_nodes), self.horizon
        self.leaf_tokens = torch.zeros(n, horizon, dtype=torch.long)
        self.leaf_mask = torch.zeros(n, horizon)
        self.leaf_path = torch.zeros(n, horizon + 1, dtype=torch.long)  # node ids of s_0 … s_H
        self.leaf_prompt = torch.zeros(n, dtype=torch.long)
        self.leaf_of = {}
        for i, node in enumerate(self.leaf_nodes.tolist()):
            p, y = self.nodes[node]
            self.leaf_prompt[i] = p
            self.leaf_of[(p, y)] = i
            self.leaf_tokens[i, : len(y)] = torch.tensor(y, dtype=torch.long)
            self.leaf_mask[i, : len(y)] = 1.0
            path = [self.node_index[(p, y[:h])] for h in range(len(y) + 1)]
            self.leaf_path[i] = torch.tensor(path + [node] * (horizon + 1 - len(path)))

    @cached_property
    def leaf_pairs(self) -> tuple[Tensor, Tensor]:
        """(first, second) leaf ids of every ordered pair of one prompt's leaves, prompt by prompt:
        the pairs the exact upper loss sums over (Σ_x n_x² of them, made once, on first use)."""
        first, second = [], []
        for p in range(self.prompts):
            leaves = (self.leaf_prompt == p).nonzero().squeeze(-1)
            first.append(leaves.repeat_interleave(len(leaves)))
            second.append(leaves.repeat(len(leaves)))
        return torch.cat(first), torch.cat(second)

    def path_states(self, path: Tensor) -> Tensor:
        """State ids of s_0 … s_{H−1} along node paths [N, H+1]; terminal nodes map to state 0 (masked)."""
        return self.state_of_node[path[:, :-1]].clamp(min=0)

