"""`train` on the tiny model end to end: every artefact, resume after a kill, and bad input."""

import json
from pathlib import Path

import datasets
import probe_store
import pytest
import torch
from conftest import run_cli
from peft import PeftModel
from safetensors.torch import load_file

from rlhf_bilevel import environment, tracking
from rlhf_bilevel import estimators as est
from rlhf_bilevel.commands.train import build, resume, train
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.lm.heads import REWARD_ADAPTER
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.run_folder import RunFolder
from rlhf_bilevel.types import ADAPTERS, LAMBDA

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "tiny-debug.yaml"
SETTINGS = ["bilevel.outer_steps=4", "train.save_every=2", "train.keep=null"]


def tiny_recipe(*overrides):
    return load_recipe(TINY, [*SETTINGS, *overrides])


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without wall-clock times, which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(tiny_recipe(), run_dir, RECIPES)
    return run_dir, summary


def test_run_writes_metrics_for_every_inner_and_outer_step(finished_run):
    run_dir, summary = finished_run
    recipe = tiny_recipe()
    cfg = recipe.bilevel
    metrics = records(run_dir, "metrics.jsonl")
    inner = [r for r in metrics if r["phase"] == "inner"]
    outer = [r for r in metrics if r["phase"] == "outer"]
    assert [r["step"] for r in inner] == list(range(1, cfg.outer_steps * cfg.inner_steps + 1))
    assert [r["step"] for r in outer] == [t * cfg.inner_steps for t in range(cfg.outer_steps + 1)]
    for key in ("upper/loss", "lower/J", "lower/kl", "eval/agreement", "gold/score", "gold/reference",
                "upper/d_norm", "penalty/gap", "oracle/pairs", "tokens/generated", "time/elapsed_s"):
        assert all(key in r for r in outer[1:]), key
    for key in ("lower/J", "lower/kl", "lower/d_norm", "lower/d_prime_norm", "oracle/pairs", "tokens/generated"):
        assert all(key in r for r in inner), key
    assert outer[-1]["oracle/pairs"] == cfg.outer_steps * cfg.pairs_per_outer_step == summary.oracle_pairs
    assert outer[-1]["tokens/generated"] == summary.tokens_generated > 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "summary.json").read_text())["oracle_pairs"] == summary.oracle_pairs


def test_every_labelled_pair_is_kept_in_trl_format(finished_run):
    run_dir, summary = finished_run
    data = datasets.load_dataset("json", data_files=str(run_dir / "preferences.jsonl"), split="train")
    assert len(data) == summary.oracle_pairs
    assert {"prompt", "chosen", "rejected", "first", "second", "label", "policy", "outer_step", "inner_step"} <= set(data.column_names)
    assert set(data["policy"]) == {"lambda_prime"}  # bilevel: every pair comes from π_λ′ (eq. 7 at λ′)
    cfg = tiny_recipe().bilevel
    per_outer = [sum(1 for t in data["outer_step"] if t == step) for step in range(cfg.outer_steps)]
    assert per_outer == [cfg.pairs_per_outer_step] * cfg.outer_steps
    for row in data:
        assert {row["chosen"], row["rejected"]} == {row["first"], row["second"]}


def test_the_store_a_run_saves_refits_its_reward_model_offline(finished_run):
    """scripts/probe_store.py reads every labelled pair back from the last checkpoint, and refits φ
    on them from φ₀: the labels' loss falls, while a strong prior keeps the margins near φ₀'s zeros."""
    run_dir, summary = finished_run
    run = probe_store.load_run(run_dir)
    assert len(run.pairs) == summary.oracle_pairs
    reward_cfg = tiny_recipe().reward
    dim = run.pairs.rollout.context.features.shape[-1]
    start = probe_store.reward_model(reward_cfg, dim)
    assert probe_store.agreement_on(start, [run]) == 0.5  # a zero-initialised head ties every pair
    ones = torch.ones(1, dtype=torch.float64)

    def nll(reward):
        with torch.no_grad():
            return est.store_loss([reward.member_rewards(run.pairs.rollout)], [run.pairs], ones, "bt_nll").item()

    fitted = probe_store.refit(probe_store.reward_model(reward_cfg, dim), [run.pairs], prior=0.0, steps=50, lr=0.05)
    assert nll(fitted) < nll(start) - 0.05
    held = probe_store.refit(probe_store.reward_model(reward_cfg, dim), [run.pairs], prior=1e4, steps=50, lr=0.05)
    assert probe_store.margins(held, run.pairs).abs().mean() < 0.25 * probe_store.margins(fitted, run.pairs).abs().mean()
    in_run = probe_store.reward_model(reward_cfg, dim)
    in_run.load_state_dict(run.reward_state)  # φ as the run left it
    assert probe_store.margins(in_run, run.pairs).abs().max() > 0


def test_checkpoint_keeps_each_adapter_once_in_plain_peft(finished_run, tmp_path):
    run_dir, _ = finished_run
    last = run_dir / "checkpoint-000004"
    assert (run_dir / "checkpoint-000002").is_dir() and last.is_dir()
    state = json.loads((last / "state.json").read_text())
    assert state["recipe"]["bilevel"]["outer_steps"] == 4
    for key in ("reward", "critics", "generator", "bilevel"):
        assert key in state
    assert not any("lora_" in key for key in load_file(last / "state.safetensors")), "adapters saved twice"
    for name in ADAPTERS:
        assert (last / "adapters" / name / "adapter_config.json").is_file()
    base, tokenizer = tiny.build()
    loaded = PeftModel.from_pretrained(base, last / "adapters" / LAMBDA)
    trained = {key: value for key, value in loaded.named_parameters() if "lora_" in key}
    assert trained
    moved = any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    assert moved, "training left λ at its initialisation"
    # what a resume loads into the run's model is what plain peft reads
    trainer = build(tiny_recipe(), tmp_path, RECIPES)
    RunFolder(run_dir).load(last, trainer.model, trainer.adapters)
    params = dict(trainer.model.named_parameters())
    for key, value in trained.items():
        assert torch.equal(params[key.replace(".default.", f".{LAMBDA}.")], value), key


def test_a_seeded_run_repeats_exactly_whatever_omp_num_threads_says(tmp_path, monkeypatch, finished_run):
    # the recipe's train.threads (1) decides, not the environment: a run in a fresh process told to use
    # 2 threads gives every number of the run in this one, to the last bit
    reference_dir, _ = finished_run
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    result = run_cli("train", "--recipe", str(TINY), "--output-dir", str(tmp_path / "run"), *sets, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert comparable(records(tmp_path / "run", "metrics.jsonl")) == comparable(records(reference_dir, "metrics.jsonl"))
    for run_dir in (reference_dir, tmp_path / "run"):
        numerics = json.loads((run_dir / "run.json").read_text())["environment"]
        assert numerics["threads"] == 1 and numerics["dtype"] == "float32" and numerics["device"] == "cpu"


def test_a_run_leaves_the_process_as_it_found_it(tmp_path):
    # its thread count and the random streams its initialisations draw from are its own
    from transformers.utils import logging as hf_logging

    rng, verbosity = torch.get_rng_state(), hf_logging.get_verbosity()
    with environment.threads(2):  # the recipe's count is 1
        train(tiny_recipe("bilevel.outer_steps=1"), tmp_path, RECIPES)
        assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng) and hf_logging.get_verbosity() == verbosity
    assert json.loads((tmp_path / "run.json").read_text())["environment"]["threads"] == 1


def test_killed_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, finished_run):
    reference_dir, _ = finished_run
    run_dir = tmp_path / "killed"
    log = tracking.Tracker.log
    cfg = tiny_recipe().bilevel

    def killed_at_step_3(self, metrics, step, phase):
        log(self, metrics, step, phase)
        if phase == "outer" and step == 3 * cfg.inner_steps:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.Tracker, "log", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(), run_dir, RECIPES)
    monkeypatch.setattr(tracking.Tracker, "log", log)
    assert not (run_dir / "checkpoint-000003").exists()
    resume(run_dir)
    assert comparable(records(run_dir, "metrics.jsonl")) == comparable(records(reference_dir, "metrics.jsonl"))
    assert records(run_dir, "preferences.jsonl") == records(reference_dir, "preferences.jsonl")


def test_alternating_switch_uses_lambda_pairs(tmp_path):
    # with the per-prompt leave-one-out critic, λ's rollouts drawn two to a prompt
    recipe = tiny_recipe("bilevel.method=alternating", "bilevel.outer_steps=2", "bilevel.critic.kind=rloo", "bilevel.responses_per_prompt=2")
    summary = train(recipe, tmp_path, RECIPES)
    data = records(tmp_path, "preferences.jsonl")
    assert {r["policy"] for r in data} == {"lambda"} and len(data) == summary.oracle_pairs == 2 * 4 * 3


def test_reward_model_with_its_own_lora_trains_saves_and_evaluates(tmp_path):
    # φ = head + a LoRA adapter of its own: the trunk's reward adapter starts as the base (lora_B = 0)
    # and only the φ step moves it, so a moved lora_B shows the upper gradient reached the trunk
    run_dir = tmp_path / "run"
    train(tiny_recipe("reward.lora=true", "bilevel.outer_steps=2"), run_dir, RECIPES)
    last = run_dir / "checkpoint-000002"
    assert {path.name for path in (last / "adapters").iterdir() if path.is_dir()} == {*ADAPTERS, REWARD_ADAPTER}
    assert (last / "adapters" / REWARD_ADAPTER / "adapter_config.json").is_file()
    reward_adapter = load_file(last / "adapters" / REWARD_ADAPTER / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in reward_adapter.items() if "lora_B" in k)
    result = run_cli("eval", "--run", str(run_dir), "--prompts", "4", "--resamples", "50")
    assert result.returncode == 0, result.stderr
    assert "reward-model agreement" in result.stdout


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--set", "bilevel.sigmaa=1"], "bilevel.sigmaa"),
        (["--set", "oracle.kind=sentimnt"], "oracle.kind"),
        (["--set", "prompts.train=missing.jsonl"], "prompts.train"),
        (["--model", "./no/such/model"], "model.name"),
        (["--set", "bilevel.inner_steps=0"], "bilevel.inner_steps"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, field):
    out = tmp_path / "run"
    result = run_cli("train", "--recipe", str(TINY), "--output-dir", str(out), *extra, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and field in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_trains_and_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--recipe", str(TINY), "--output-dir", str(out), "--set", "bilevel.outer_steps=1"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gold score on held-out prompts" in result.stdout
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode != 0 and "--resume" in again.stderr
    done = run_cli("train", "--resume", str(out), "--set", "bilevel.outer_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert records(out, "metrics.jsonl")[-1]["step"] == 2 * load_recipe(TINY).bilevel.inner_steps
