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


def test_exponent_floats_read_as_numbers_and_out_of_range_numbers_are_refused():
    # YAML 1.1 reads 1e-4 (no dot) as a string; a user means the number
    cfg = build(BilevelConfig, apply_overrides({}, ["sigma=1e-4", "beta=2E1"]))
    assert cfg.sigma == 1e-4 and cfg.beta == 20.0
    with pytest.raises(ConfigError, match=r"^sigma: must be a finite number"):
        build(BilevelConfig, {"sigma": 1e308})  # beyond float32, what the run computes in
    with pytest.raises(ConfigError, match=r"^sigma: must be a finite number"):
        build(BilevelConfig, {"sigma": 10**400})  # float() of this int would raise OverflowError
    with pytest.raises(ConfigError, match=r"^outer_steps: must be a whole number from 0 to 2\*\*63 - 1, got -1$"):
        build(BilevelConfig, {"outer_steps": -1})
    with pytest.raises(ConfigError, match=r"^critic\.batch_size: must be > 0"):
        build(BilevelConfig, {"critic": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"… \(\d+ characters\)$"):
        build(BilevelConfig, {"sigma": "x" * 10_000})  # a quoted value is cut: the error stays one readable line


def test_a_partial_section_keeps_its_default_in_the_parent():
    """`policy_step: {lr: 0.2}` changes lr only: the rule stays the parent's Adam, not StepConfig's own default."""
    cfg = build(BilevelConfig, {"policy_step": {"lr": 0.2}, "critic": {"lr": 0.5}})
    assert (cfg.policy_step.rule, cfg.policy_step.schedule, cfg.policy_step.lr) == ("adam", "constant", 0.2)
    assert cfg.reward_step == BilevelConfig().reward_step and cfg.critic.lr == 0.5
