"""preferences.jsonl trains TRL's RewardTrainer and DPOTrainer as is: no conversion step between our run and theirs."""

from pathlib import Path

import datasets
import pytest
import torch
from transformers import LlamaForSequenceClassification
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

from rlhf_bilevel.commands.train import train
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trl") / "run"
    train(load_recipe(RECIPES / "tiny-debug.yaml", ["bilevel.outer_steps=1"]), run_dir, RECIPES)
    return datasets.load_dataset("json", data_files=str(run_dir / "preferences.jsonl"), split="train")


def trains(trainer, model) -> None:
    """Two optimiser steps with a finite loss that moved the weights."""
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


TRAINING = dict(max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)


def test_reward_trainer_takes_the_preferences_file_as_is(pairs, tmp_path):
    lm, tokenizer = tiny.build()
    model = LlamaForSequenceClassification(lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1}))
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "rm"), **TRAINING)
    trains(RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer), model)


def test_dpo_trainer_takes_the_preferences_file_as_is(pairs, tmp_path):
    model, tokenizer = tiny.build()
    reference, _ = tiny.build()  # a model built in code has no hub path for DPO to load its reference from
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **TRAINING)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
    trains(trainer, model)
