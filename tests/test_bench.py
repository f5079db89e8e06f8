"""The benchmark's parts: exclusive phase timing, the floor arithmetic, timing that changes nothing, and
a comparison of every method in both dtypes, each at its best, on settings shown to be equal."""

import json
from pathlib import Path

import pytest
import torch

from rlhf_bilevel.commands.bench import (
    BILEVEL_PHASES, CONFIGS, SHARED_SETTINGS, PhaseTimer, best_of, check_settings, headline, instrument, main,
    measure_floors, run_benchmark, summarise, table, worker,
)
from rlhf_bilevel.commands.train import build
from rlhf_bilevel.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nested_phases_pause_the_phase_they_interrupt():
    clock = Clock()
    timer = PhaseTimer(clock)
    timer.mark("lambda_step")
    clock.now = 1.0
    with timer.phase("rollouts"):
        clock.now = 3.0
        with timer.phase("reference"):
            clock.now = 3.5
        clock.now = 4.0
    clock.now = 6.0
    timer.mark(None)
    clock.now = 100.0  # outside any phase: charged to none
    timer.mark("phi_step")
    clock.now = 101.0
    timer.mark(None)
    assert dict(timer.seconds) == {"lambda_step": 3.0, "rollouts": 2.5, "reference": 0.5, "phi_step": 1.0}


def test_instrument_decides_per_call():
    clock = Clock()
    timer = PhaseTimer(clock)

    class Thing:
        on = False

        def work(self, x):
            clock.now += 2.0
            return x + 1

    thing = Thing()
    timer.instrument(thing, "work", lambda: "on" if thing.on else None)
    assert thing.work(1) == 2
    thing.on = True
    assert thing.work(1) == 2
    assert dict(timer.seconds) == {"on": 2.0}


def test_summary_against_hand_computed_floor():
    results = {
        "generate": {"seconds": 2.0, "tokens": 100, "peak_rss_mb": 400.0},
        "lora_step": {"seconds": 1.0, "tokens": 100, "peak_rss_mb": 420.0},
        "bilevel": {"seconds": 12.0, "tokens": 200, "pairs": 12, "peak_rss_mb": 500.0},
    }
    rows = summarise(results)
    assert rows["bilevel"]["floor_s"] == pytest.approx(200 * (0.02 + 0.01))
    assert rows["bilevel"]["to_floor"] == pytest.approx(12.0 / 6.0)
    assert rows["bilevel"]["s_per_pair"] == pytest.approx(1.0)
    assert rows["bilevel"]["tokens_per_s"] == pytest.approx(200 / 12)
    assert rows["bilevel"]["rss_to_base"] == pytest.approx(1.25)
    assert "s_per_pair" not in rows["generate"]
    assert "peak GPU" not in table(rows)
    results["bilevel"]["peak_gpu_mb"] = 300.0  # measured on a GPU: a column of its own
    assert summarise(results)["bilevel"]["peak_gpu_mb"] == 300.0
    assert table(summarise(results)).splitlines()[-1].endswith("| 300 |")


def test_timing_hooks_change_nothing_and_cover_the_outer_step(tmp_path):
    """Same seed, with and without the timing proxies: the same adapters and reward head afterwards."""
    judge = "reward.judge={question: is it good, answers: [lovely, horrible], answer_prefix: it is, words: true}"
    recipe = load_recipe(RECIPES / "tiny-debug.yaml", ["bilevel.inner_steps=1", judge])
    plain = build(recipe, tmp_path / "plain", RECIPES)
    plain.bilevel.outer_step()
    timed = build(recipe, tmp_path / "timed", RECIPES)
    timer = PhaseTimer()
    instrument(timed, timer)
    timer.mark(None)
    metrics = timed.bilevel.outer_step()
    timer.mark(None)
    for a, b in zip(plain.model.parameters(), timed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.reward.parameters(), timed.reward.parameters()):
        assert torch.equal(a, b)
    assert set(timer.seconds) == set(BILEVEL_PHASES)
    assert sum(timer.seconds.values()) <= metrics["time/outer_s"] * 1.05 + 0.01


def test_floors_generate_exactly_the_horizon():
    recipe = load_recipe(RECIPES / "tiny-debug.yaml", ["rollout.max_new_tokens=6"])
    floors = measure_floors(recipe, RECIPES, repeats=1)
    expected = 2 * recipe.bilevel.pairs_per_step * 6
    assert floors["generate"]["tokens"] == floors["lora_step"]["tokens"] == expected
    assert all(f["seconds"] > 0 and f["peak_rss_mb"] > 0 for f in floors.values())


def test_a_bad_override_is_one_line_before_any_worker_starts(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--quick", "--set", "bilevel.sigmaa=1"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bilevel.sigmaa: unknown key (did you mean 'sigma'?)"


def tiny_policy(dtype="float32", **switches):
    from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
    from rlhf_bilevel.lm.policy import LMPolicy, RolloutConfig

    base, tokenizer = load_base(ModelConfig(name="tiny", dtype=dtype))
    torch.manual_seed(0)
    model = with_adapters(base, AdapterConfig(r=4, alpha=8))
    policy = LMPolicy(model, tokenizer, RolloutConfig(max_new_tokens=6, **switches), chat_template=False)
    with torch.no_grad():  # move λ off zero so its gradients are not at a special point
        for p in policy.parameters_of("lambda"):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy


def score_and_grad(policy, rollout):
    log_probs = policy.log_probs(rollout)
    taken = log_probs.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)
    grads = torch.autograd.grad((taken * rollout.mask).sum(), policy.parameters_of("lambda"))
    return log_probs.detach(), torch.cat([g.reshape(-1) for g in grads])


def test_gradient_checkpointing_changes_no_number_and_leaves_eval_mode():
    plain, checkpointed = tiny_policy(), tiny_policy(gradient_checkpointing=True)
    rollout = plain.sample(["a good day", "the dog"], torch.Generator().manual_seed(0))
    lp_plain, g_plain = score_and_grad(plain, rollout)
    layer, calls = checkpointed.model.get_base_model().model.layers[0], []
    checkpoint = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    lp_ckpt, g_ckpt = score_and_grad(checkpointed, rollout)
    assert len(calls) == 1  # the layer went through torch's checkpoint (transformers skips it in eval mode)
    torch.testing.assert_close(lp_ckpt, lp_plain)
    torch.testing.assert_close(g_ckpt, g_plain)
    assert not checkpointed.model.training  # sampling must keep its KV cache


def test_autocast_runs_in_bf16_close_to_float32():
    plain, autocast = tiny_policy(), tiny_policy(autocast=True)
    rollout = plain.sample(["a good day", "the dog"], torch.Generator().manual_seed(0))
    lp_plain, g_plain = score_and_grad(plain, rollout)
    lp_auto, g_auto = score_and_grad(autocast, rollout)
    assert not torch.equal(lp_auto, lp_plain)  # it did run in bf16
    # bf16 keeps 8 bits of mantissa: log-probs of a ~200-token vocabulary agree to a few 1e-2
    torch.testing.assert_close(lp_auto, lp_plain, atol=0.05, rtol=0.02)
    assert torch.isfinite(g_auto).all()
    assert torch.nn.functional.cosine_similarity(g_auto, g_plain, dim=0) > 0.98


def saved_for_backward(policy, rollout):
    """{storage: (dtype, last dimension, bytes)} of the tensors autograd keeps for the backward pass of log π."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (tensor.dtype, tensor.shape[-1] if tensor.dim() else 0, storage.nbytes())
        return tensor

    with policy.adapter("lambda"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        policy.log_probs(rollout)
    return saved


def test_a_bf16_base_runs_its_adapters_in_bf16_on_the_inputs_as_they_are():
    auto, off, copying = tiny_policy(dtype="bfloat16"), tiny_policy(dtype="bfloat16", autocast=False), tiny_policy(dtype="bfloat16")
    assert auto.autocasting and not off.autocasting
    # autocast alone, with peft casting each adapter's input to the weights' float32
    copying.trunk.autocast = lambda: torch.autocast("cpu", torch.bfloat16)
    rollout = auto.sample(["a good day", "the dog"], torch.Generator().manual_seed(0))
    saved = {name: saved_for_backward(policy, rollout) for name, policy in [("auto", auto), ("off", off), ("copying", copying)]}
    width = auto.model.config.intermediate_size  # down_proj's input: no norm or attention tensor has it
    assert (torch.float32, width) in {entry[:2] for entry in saved["off"].values()}  # peft's float32 copy of the input
    assert (torch.float32, width) not in {entry[:2] for entry in saved["auto"].values()}
    held = {name: sum(entry[2] for entry in tensors.values()) for name, tensors in saved.items()}
    # q, k and v read one input: kept once, where each cast made a copy of its own
    assert held["auto"] < held["copying"] < held["off"]
    lp_auto, g_auto = score_and_grad(auto, rollout)
    lp_off, g_off = score_and_grad(off, rollout)
    torch.testing.assert_close(lp_auto, lp_off, atol=0.05, rtol=0.02)
    assert torch.nn.functional.cosine_similarity(g_auto, g_off, dim=0) > 0.98
    assert all(p.dtype == torch.float32 for p in auto.parameters_of("lambda"))  # the weights Adam steps


def test_compiled_scoring_equals_eager_for_every_adapter_and_the_reference():
    # one compiled module serves λ, λ′ and the reference: a graph reused across an adapter switch
    # would score λ′ (or π_ref) with λ's weights, which the eager comparison per adapter would catch
    eager, compiled = tiny_policy(), tiny_policy(compile=True)
    for policy in (eager, compiled):
        with torch.no_grad():
            for p in policy.parameters_of("lambda_prime"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
    prompts = ["a good day", "a good day", "the dog", "the dog"]  # pairs: the prompt cache is used too
    rollout = eager.sample(prompts, torch.Generator().manual_seed(0))
    again = compiled.sample(prompts, torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, rollout.tokens)
    for field in ("logp", "ref_logp"):
        torch.testing.assert_close(getattr(again, field), getattr(rollout, field), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.context.features, rollout.context.features, atol=1e-5, rtol=1e-5)
    scored = {}
    for adapter in ("lambda", "lambda_prime", None):
        with eager.adapter(adapter):
            lp_eager = eager.log_probs(rollout).detach()
        with compiled.adapter(adapter):
            lp_compiled = compiled.log_probs(rollout).detach()
        torch.testing.assert_close(lp_compiled, lp_eager, atol=1e-5, rtol=1e-5)
        scored[adapter] = lp_compiled
    assert not torch.allclose(scored["lambda"], scored["lambda_prime"])
    assert not torch.allclose(scored["lambda"], scored[None])
    lp_eager, g_eager = score_and_grad(eager, rollout)
    lp_compiled, g_compiled = score_and_grad(compiled, rollout)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-5, rtol=1e-4)


def test_worker_runs_on_the_threads_it_is_given():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = worker("floors", RECIPES / "tiny-debug.yaml", ["rollout.max_new_tokens=2"], repeats=1, warmup=0, threads=1)
        assert torch.get_num_threads() == 1
        assert set(result) == {"generate", "lora_step"}
    finally:
        torch.set_num_threads(previous)


def test_every_method_is_measured_in_both_dtypes_and_compared_at_its_best(tmp_path):
    overrides = ["rollout.max_new_tokens=4", "bilevel.inner_steps=1"]
    out = tmp_path / "bench.json"
    report = run_benchmark(RECIPES / "tiny-debug.yaml", overrides, out, repeats=1, log=lambda line: None, runner=worker)
    results, summary = report["results"], report["summary"]
    assert set(results) == {"float32", "bfloat16"}
    for dtype, by_config in results.items():
        assert set(by_config) == {"generate", "lora_step", *CONFIGS}
        for method in CONFIGS:  # each ran on the dtype path it is reported under
            settings = by_config[method]["settings"]
            assert settings["base_dtype"] == dtype and settings["autocast"] is (dtype == "bfloat16")
            assert by_config[method]["pairs"] == 8  # B(K + 1), for TRL as for us
    for method in CONFIGS:
        per_dtype = {dtype: summary[dtype][method]["s_per_pair"] for dtype in results}
        assert report["best"][method]["dtype"] == min(per_dtype, key=per_dtype.get)
        assert report["best"][method]["s_per_pair"] == min(per_dtype.values())
    for method in ("bilevel", "alternating"):
        ratio = report["best"][method]["s_per_pair"] / report["best"]["online_dpo"]["s_per_pair"]
        assert report["headline"][f"{method}_to_online_dpo"] == pytest.approx(ratio)
    runs = [r["settings"] for by_config in results.values() for r in by_config.values() if "settings" in r]
    assert len(runs) == 6
    for key in SHARED_SETTINGS:
        assert len({json.dumps(settings[key]) for settings in runs}) == 1, key
    assert (runs[0]["max_new_tokens"], runs[0]["pairs_per_step"], runs[0]["lora_r"]) == (4, 4, 4)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    written = out.with_suffix(".md").read_text()
    assert report["tables"]["settings"] in written and report["tables"]["best"] in written
    assert f"bilevel_to_online_dpo: {report['headline']['bilevel_to_online_dpo']:.3f}" in written


def result(seconds, pairs=12, tokens=120):
    return {"seconds": seconds, "pairs": pairs, "tokens": tokens, "peak_rss_mb": 500.0}


def test_the_headline_is_each_method_at_its_own_best_dtype():
    floors = {"float32": 0.02, "bfloat16": 0.01}  # seconds per token of generate, of the LoRA step alike
    results = {
        dtype: {"generate": result(f * 100, tokens=100), "lora_step": result(f * 100, tokens=100)} for dtype, f in floors.items()
    }
    results["float32"].update(bilevel=result(12.0), online_dpo=result(24.0))  # TRL is faster in float32,
    results["bfloat16"].update(bilevel=result(6.0), online_dpo=result(48.0))  # we are in bf16
    best = best_of(results)
    assert best["bilevel"] == {"dtype": "bfloat16", "s_per_pair": 0.5, "to_fastest_floor": pytest.approx(6.0 / (120 * 0.02))}
    assert best["online_dpo"]["dtype"] == "float32" and best["online_dpo"]["s_per_pair"] == 2.0
    assert headline(best) == {"bilevel_to_online_dpo": 0.25}
    assert "alternating" not in best
    del results["float32"]["online_dpo"], results["bfloat16"]["online_dpo"]
    assert headline(best_of(results)) == {}  # no peer measured: no ratio to it


def settings(**changed):
    return {"max_new_tokens": 32, "pairs_per_step": 4, "labelled_pairs": 12, "lora_r": 16, "lora_alpha": 32,
            "lora_targets": ["q_proj", "v_proj"], "device": "cpu", "base_dtype": "float32", "autocast": False, **changed}


def test_a_comparison_on_unequal_settings_is_refused():
    def runs(**changed):
        bf16 = {"base_dtype": "bfloat16", "autocast": True}
        return {
            "float32": {"bilevel": {"settings": settings()}, "online_dpo": {"settings": settings(**changed)}},
            "bfloat16": {"bilevel": {"settings": settings(**bf16)}, "online_dpo": {"settings": settings(**bf16)}},
        }

    check_settings(runs())  # the dtype path differs between dtypes, as it should
    for changed in ({"max_new_tokens": 16}, {"pairs_per_step": 8}, {"lora_r": 8}, {"lora_targets": ["q_proj"]},
                    {"labelled_pairs": 16}, {"autocast": True}, {"device": "cuda:0"}):
        key = next(iter(changed))
        with pytest.raises(RuntimeError, match=f"different {key}: .*online_dpo \\(float32\\)"):
            check_settings(runs(**changed))


def test_the_outer_step_is_measured_on_the_device_of_the_recipe(monkeypatch):
    """The trainer the benchmark times is placed where `train.device` says, not on the CPU a default `World` is."""
    import rlhf_bilevel.commands.bench as bench

    class Placed(Exception):
        pass

    def capture(recipe, run_dir, base_dir, world):
        raise Placed(world.device)

    asked = []
    monkeypatch.setattr(bench, "resolve_device", lambda name: asked.append(name) or torch.device("meta"))
    monkeypatch.setattr(bench, "build", capture)
    with pytest.raises(Placed) as placed:
        bench.measure_outer_step(load_recipe(RECIPES / "tiny-debug.yaml", ["train.device=cuda"]), RECIPES, warmup=0)
    assert asked == ["cuda"] and placed.value.args[0] == torch.device("meta")
