"""The exact testbed assembled: a problem, its models, and Algorithm 1 wired to exact or sampled gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_bilevel.bilevel import Bilevel
from rlhf_bilevel.config import BilevelConfig, ConfigError
from rlhf_bilevel.critic import QHead, TDCritic
from rlhf_bilevel.exact import solve
from rlhf_bilevel.exact.models import ExactPolicy, ExactReward, GoldOracle
from rlhf_bilevel.exact.tree import TokenTree, TreeError
from rlhf_bilevel.labelling import Labeller
from rlhf_bilevel.sampling import SampledRollouts


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest class

    prompts: int = 3
    vocab: int = 4
    horizon: int = 3
    policy_hidden: int = 32
    reward_hidden: int = 4
    temperature: float = 0.5  # of the gold Bradley–Terry oracle
    seed: int = 0


class Testbed:
    __test__ = False  # not a pytest class

    def __init__(self, cfg: TestbedConfig, beta: float, gamma: float, loss: str):
        try:
            self.tree = TokenTree(cfg.prompts, cfg.vocab, cfg.horizon)
        except TreeError as error:
            raise ConfigError(str(error)) from None
        if cfg.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {cfg.temperature}")
        if cfg.reward_hidden < 0:
            raise ConfigError(f"reward_hidden: a width ≥ 0 (0: a logistic unit), got {cfg.reward_hidden}")
        self.cfg = cfg
        self.gold = GoldOracle(self.tree, temperature=cfg.temperature, seed=cfg.seed + 1)
        policy = self.new_policy()
        with torch.no_grad(), policy.adapter(None):
            ref = policy.table()
        self.problem = solve.Problem(self.tree, ref, self.gold, beta, gamma, loss)

    def reward(self, seed: int) -> ExactReward:
        return ExactReward(self.tree, hidden=self.cfg.reward_hidden, seed=seed)

    def algorithm(self, cfg: BilevelConfig, reward: ExactReward, exact: bool, seed: int = 0) -> Bilevel:
        """Algorithm 1 on this testbed: enumerated rollouts and exact Q, or samples and the TD critic."""
        generator = torch.Generator().manual_seed(seed)
        init = torch.Generator().manual_seed(self.cfg.seed)  # the policy's weights, then the critics' heads
        policy = self.new_policy(init)
        if exact:
            source = solve.ExactRollouts(policy)

            def make_critic(adapter: str) -> solve.ExactCritic:
                return solve.ExactCritic(self.problem, policy, reward, adapter)
        else:
            source = SampledRollouts(policy, list(range(self.tree.prompts)), generator)

            def make_critic(adapter: str) -> TDCritic:
                head = QHead(policy.inputs.shape[1], self.tree.vocab, cfg.critic.hidden, init)
                return TDCritic(policy.state_features, head, cfg.gamma, cfg.critic, generator)

        return Bilevel(policy, reward, source, Labeller(self.gold), make_critic, cfg, generator)

    def new_policy(self, generator: torch.Generator | None = None) -> ExactPolicy:
        """λ = λ′ = π_ref on this problem's base, its weights drawn from `generator`: by default a fresh one
        seeded with the testbed's seed, as the problem's reference was, so that every policy has its base."""
        generator = generator or torch.Generator().manual_seed(self.cfg.seed)
        return ExactPolicy(self.tree, generator, hidden=self.cfg.policy_hidden)

