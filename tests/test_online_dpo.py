"""TRL's Online DPO on the project's problem: exact oracle budget, a plain peft adapter, reproducible."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.labelling import Labeller
from rlhf_bilevel.lm.model import ModelConfig, load_base
from rlhf_bilevel.online_dpo import RESULT_FILE, OracleJudge, response_length, train_online_dpo
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.preferences import PreferenceLog
from rlhf_bilevel.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


class FirstWins:
    name = "first-wins"
    offers = Offers.COMPARISON
    positional = False

    def compare(self, prompts, first, second):
        return torch.ones(len(prompts))


def tiny_recipe(*overrides):
    return load_recipe(RECIPES / "tiny-debug.yaml", list(overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    return out, train_online_dpo(tiny_recipe(), out, RECIPES, pairs=8, beta=0.1, learning_rate=0.05, snapshot_every=4)


def test_uses_exactly_the_budget_and_logs_every_pair(run):
    out, result = run
    assert result.oracle_pairs == 8 and result.steps == 2  # B = pairs_per_step = 4 pairs per step
    records = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(records) == 8
    assert {r["step"] for r in records} == {0, 1}
    assert all(r["chosen"] == (r["first"] if r["label"] == 1 else r["second"]) for r in records)
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["oracle_pairs"] == 8 and saved["tokens_generated"] == result.tokens_generated
    horizon = tiny_recipe().rollout.max_new_tokens
    assert 0 < result.tokens_generated <= 2 * 8 * horizon


def test_adapter_loads_in_plain_peft_and_has_moved(run):
    out, result = run
    base, _ = load_base(ModelConfig(name="tiny"))
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    lora_b = [p for key, p in model.named_parameters() if "lora_B" in key]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # lora_B starts at zero: training moved it
    assert model.peft_config["default"].r == tiny_recipe().adapters.r


def test_snapshots_keep_the_adapter_along_the_way(run):
    out, result = run
    assert sorted(result.snapshots) == [4, 8] and result.snapshots[8] == result.adapter_dir
    halfway, final = (load_file(Path(result.snapshots[p]) / "adapter_model.safetensors") for p in (4, 8))
    assert halfway.keys() == final.keys()
    assert any(not torch.equal(halfway[k], final[k]) for k in final)  # the second step moved it on


def test_same_seed_same_run(run, tmp_path):
    out, _ = run
    again = tmp_path / "again"
    train_online_dpo(tiny_recipe(), again, RECIPES, pairs=8, beta=0.1, learning_rate=0.05)
    assert (again / "preferences.jsonl").read_text() == (out / "preferences.jsonl").read_text()
    first = load_file(out / "adapters" / "lambda" / "adapter_model.safetensors")
    second = load_file(again / "adapters" / "lambda" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_budget_must_be_whole_steps(tmp_path):
    with pytest.raises(ConfigError, match="pairs: must be a positive multiple of bilevel.pairs_per_step=4"):
        train_online_dpo(tiny_recipe(), tmp_path / "run", RECIPES, pairs=6)


def test_judge_scores_the_oracle_winner_one_and_counts_pairs(tmp_path):
    log = PreferenceLog(tmp_path / "p.jsonl")
    judge = OracleJudge(Labeller(FirstWins()), eos=1, generator=torch.Generator().manual_seed(0), log=log)
    rewards = judge(prompts=["x", "y"] * 2, completions=["a", "b", "c", "d"], completion_ids=[[5, 1, 1], [5, 5, 5], [1, 0, 0], [5, 1, 0]],
                    query=["p", "q", "p", "q"])
    assert rewards == [1.0, 1.0, 0.0, 0.0]  # TRL keeps the first half when first >= second
    assert judge.pairs == 2 and judge.tokens == 2 + 3 + 1 + 2 and len(log) == 2


def test_response_length_counts_through_the_first_eos():
    assert response_length([4, 4, 1, 1], eos=1) == 3
    assert response_length([4, 4, 4], eos=1) == 3


@pytest.mark.parametrize(
    "autocast, dtype, expected", [("false", "float32", False), ("true", "float32", True), ("auto", "float32", False), ("auto", "bfloat16", True)]
)
def test_trl_autocasts_to_bf16_only_when_our_trainer_does(monkeypatch, tmp_path, autocast, dtype, expected):
    import trl.experimental.online_dpo as trl_online_dpo

    class Stop(Exception):
        pass

    def capture(*, args, **kwargs):
        raise Stop(args)

    monkeypatch.setattr(trl_online_dpo, "OnlineDPOTrainer", capture)
    with pytest.raises(Stop) as stopped:
        train_online_dpo(tiny_recipe(f"rollout.autocast={autocast}", f"model.dtype={dtype}"), tmp_path / "run", RECIPES, pairs=4)
    assert stopped.value.args[0].bf16 is expected  # TRL's own default is bf16 autocast


def test_the_run_records_the_settings_it_trained_with(run):
    out, result = run
    recipe = tiny_recipe()
    assert result.settings["max_new_tokens"] == recipe.rollout.max_new_tokens
    assert result.settings["pairs_per_step"] == recipe.bilevel.pairs_per_step
    assert (result.settings["lora_r"], result.settings["lora_alpha"]) == (recipe.adapters.r, recipe.adapters.alpha)
    assert len(result.settings["lora_targets"]) == 14  # all-linear: q, k, v, o, gate, up, down of two layers
    assert result.settings["device"] == "cpu" and result.settings["base_dtype"] == "float32"
    assert json.loads((out / RESULT_FILE).read_text())["settings"] == result.settings


@pytest.mark.parametrize("device, use_cpu", [("cpu", True), ("cuda", False)])
def test_trl_trains_on_the_device_of_the_recipe(monkeypatch, tmp_path, device, use_cpu):
    """The base is loaded on `train.device` and TRL is told to use the CPU only where that is the CPU
    (this machine has no GPU: the placement is checked where it is decided)."""
    import trl.experimental.online_dpo as trl_online_dpo

    import rlhf_bilevel.online_dpo as online_dpo

    class Stop(Exception):
        pass

    def capture(*, args, **kwargs):
        raise Stop(args)

    loaded, load = [], online_dpo.load_base
    monkeypatch.setattr(online_dpo, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(online_dpo, "load_base", lambda cfg, place: loaded.append(place) or load(cfg))
    monkeypatch.setattr(trl_online_dpo, "OnlineDPOTrainer", capture)
    with pytest.raises(Stop) as stopped:
        train_online_dpo(tiny_recipe(f"train.device={device}"), tmp_path / "run", RECIPES, pairs=4)
    assert loaded == [torch.device(device)]
    assert stopped.value.args[0].use_cpu is use_cpu
