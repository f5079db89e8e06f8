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


def test_responses_per_prompt_divides_the_batch_and_rloo_needs_two():
    assert build(BilevelConfig, {"trajectories_per_step": 8, "responses_per_prompt": 4, "critic": {"kind": "rloo"}}).responses_per_prompt == 4
    with pytest.raises(ConfigError, match=r"^responses_per_prompt: 3 responses per prompt do not divide trajectories_per_step=8; use a divisor"):
        build(BilevelConfig, {"trajectories_per_step": 8, "responses_per_prompt": 3})
    with pytest.raises(ConfigError, match=r"^critic\.kind: rloo .* set bilevel\.responses_per_prompt=4$"):
        build(BilevelConfig, {"critic": {"kind": "rloo"}})


def test_a_partial_section_keeps_its_default_in_the_parent():
    """`policy_step: {lr: 0.2}` changes lr only: the rule stays the parent's Adam, not StepConfig's own default."""
    cfg = build(BilevelConfig, {"policy_step": {"lr": 0.2}, "critic": {"lr": 0.5}})
    assert (cfg.policy_step.rule, cfg.policy_step.schedule, cfg.policy_step.lr) == ("adam", "constant", 0.2)
    assert cfg.reward_step == BilevelConfig().reward_step and cfg.critic.lr == 0.5


def test_a_variant_keeps_its_parents_default_only_when_it_is_the_same_variant():
    """With a tuned sentiment oracle as the default in the parent: a section of that kind keeps its
    values; a section of another kind keeps those of the keys it takes too, its own defaults
    for the rest, and never takes the other kind's keys."""
    import dataclasses

    from rlhf_bilevel.oracles.base import OracleConfig, ScoredConfig
    from rlhf_bilevel.oracles.http import HttpConfig
    from rlhf_bilevel.oracles.rules import LengthConfig

    tuned = ScoredConfig(temperature=0.5, retries=7)
    same = build(OracleConfig, {"flip": 0.1}, "oracle", tuned)  # the kind picks the class
    assert type(same) is ScoredConfig and (same.temperature, same.retries, same.flip) == (0.5, 7, 0.1)
    other = build(OracleConfig, {"kind": "length", "target_words": 3}, "oracle", tuned)
    assert type(other) is LengthConfig and other == LengthConfig(kind="length", target_words=3, retries=7, temperature=0.5)
    http = build(OracleConfig, {"kind": "http"}, "oracle", tuned)
    assert type(http) is HttpConfig and http == HttpConfig(kind="http", retries=7)
    kept = build(OracleConfig, {"target_words": 5}, "oracle", LengthConfig(kind="length", temperature=0.3))
    assert kept == LengthConfig(kind="length", temperature=0.3, target_words=5)  # the kind left out is the default's
    assert "temperature" not in {f.name for f in dataclasses.fields(http)}
    with pytest.raises(ConfigError, match=r"^oracle\.temperature: unknown key for the http oracle"):
        build(OracleConfig, {"kind": "http", "temperature": 0.5}, "oracle", tuned)
