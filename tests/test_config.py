import pytest

from rlhf_bilevel.config import BilevelConfig, ConfigError, apply_overrides, build


def test_unknown_key_names_itself_and_suggests():
    with pytest.raises(ConfigError, match=r"^bilevel\.sigmaa: unknown key \(did you mean 'sigma'\?\)$"):
        build(BilevelConfig, {"sigmaa": 0.1}, "bilevel")


def test_wrong_type_and_bad_value_name_the_field():
    with pytest.raises(ConfigError, match=r"^bilevel\.inner_steps: expected int, got 'four'$"):
        build(BilevelConfig, {"inner_steps": "four"}, "bilevel")
    with pytest.raises(ConfigError, match=r"^bilevel\.sigma: must be > 0"):
        build(BilevelConfig, {"sigma": 0.0}, "bilevel")
    with pytest.raises(ConfigError, match=r"^bilevel\.method: must be one of bilevel, alternating"):
        build(BilevelConfig, {"method": "both"}, "bilevel")
    with pytest.raises(ConfigError, match=r"^bilevel\.critic\.hiden: unknown key"):
        build(BilevelConfig, {"critic": {"hiden": 3}}, "bilevel")


def test_nested_build_and_overrides():
    data = apply_overrides({"sigma": 0.1}, ["sigma=0.05", "policy_step.lr=0.2", "critic.radius=null"])
    cfg = build(BilevelConfig, data)
    assert cfg.sigma == 0.05 and cfg.policy_step.lr == 0.2 and cfg.critic.radius is None
    assert cfg.pairs_per_outer_step == cfg.pairs_per_step * (cfg.inner_steps + 1)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["sigma"])
