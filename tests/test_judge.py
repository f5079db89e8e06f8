"""The judge (`lm/judge.py`): the frozen base asked about each response, and the prior it gives r_φ.

Checked on the tiny random Llama against a plain forward pass of the base: the log-odds are those of
its next token after the judge's prompt, sampling keeps them with the rollout, and R_φ adds them,
weighted, on the last token alone. Also how scripts/probe_judge.py scores a judge against the oracle.
"""

import dataclasses
import statistics

import probe_judge
import pytest
import torch

from conftest import perturb
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.evaluate import decided
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.lm.heads import RewardConfig, TokenReward
from rlhf_bilevel.lm.judge import NEUTRAL_WORDS, Judge, JudgeConfig
from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy, RolloutConfig
from rlhf_bilevel.recipe import parse_recipe, recipe_dict
from rlhf_bilevel.types import LAMBDA, Rollout

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the dog is", "a good day for a walk", "tell me", "my neighbour said the weather was"]
# words of the tiny tokenizer's vocabulary: each answer is one token of its own
JUDGE = JudgeConfig(question="is it good", answers=("lovely", "horrible"), answer_prefix="it is", scale=0.7)


@pytest.fixture
def policy():
    """A fresh tiny model with λ moved away from the base: the judge must read the base all the same."""
    base, tokenizer = load_base(ModelConfig(name="tiny"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = with_adapters(base, AdapterConfig(r=4, alpha=8))
    perturb([p for name, p in model.named_parameters() if f".lora_B.{LAMBDA}." in name], 0.3, seed=1)
    return LMPolicy(model, tokenizer, RolloutConfig(max_new_tokens=4), chat_template=False)


def test_the_log_odds_are_the_base_models_next_token_after_the_question(policy):
    judge = Judge(policy.trunk, policy.tokenizer, policy.chat_template, JUDGE)
    responses = ["pleasant little dog", "horrible", "a b c d e f"]
    base, tokenizer = tiny.build()
    base.eval()
    lovely, horrible = tokenizer.convert_tokens_to_ids(["lovely", "horrible"])
    by_hand = []
    for text in judge.prompts(responses):
        assert text.startswith("is it good\n\n") and text.endswith("\nit is")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = base(input_ids=ids).logits[0, -1].log_softmax(-1)
        by_hand.append(logp[lovely] - logp[horrible])
    with policy.adapter(LAMBDA):  # whatever adapter is active, the judge is the base
        torch.testing.assert_close(judge.log_odds(responses), torch.stack(by_hand), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("margin", [0.0, 0.01])  # on the tiny model, 0.01 drops "the" and "a" and keeps the rest
def test_with_words_each_word_that_stands_out_adds_its_own_log_odds(policy, margin):
    """j(τ) = judge(τ) + Σ_w [s(w) − s₀ where |s(w) − s₀| > margin]: s asked of each word alone, s₀ the
    neutral words' median; words are letters, counted with repeats, whatever their case."""
    judge = Judge(policy.trunk, policy.tokenizer, policy.chat_template, dataclasses.replace(JUDGE, words=True, word_margin=margin))
    responses = ["the dog, the DOG!", "a good day 42", "..."]
    typical = statistics.median(judge.ask(NEUTRAL_WORDS).tolist())
    def stands_out(word):
        deviation = judge.ask([word]).item() - typical
        return deviation if abs(deviation) > margin else 0.0
    by_hand = torch.tensor([2 * stands_out("the") + 2 * stands_out("dog"), stands_out("a") + stands_out("good") + stands_out("day"), 0.0])
    assert (by_hand != 0).sum() >= 2  # the check is not of zeros
    torch.testing.assert_close(judge.log_odds(responses), judge.ask(responses) + by_hand, atol=1e-5, rtol=1e-4)


def test_with_words_each_distinct_word_is_asked_once(policy):
    judge = Judge(policy.trunk, policy.tokenizer, policy.chat_template, dataclasses.replace(JUDGE, words=True))
    asked = []
    read = judge.read_words
    judge.read_words = lambda words: asked.extend(words) or read(words)
    first = judge.word_evidence(["the dog the", "a dog"])
    assert sorted(asked) == sorted(NEUTRAL_WORDS + ["the", "dog", "a"])
    asked.clear()
    again = judge.word_evidence(["a dog", "my cat"])
    assert asked == ["cat", "my"] and again[0] == first[1]


def test_words_are_read_in_float32_so_their_batch_leaves_no_trace(policy):
    """A word's score is kept for the run, so it must not depend on what else its batch held. On a bf16
    base a row's result moves with its batch's padding (the responses' reader shows it); words are read
    by a float32 copy of the base, adapters off, alike alone and among longer texts to 1e-5."""
    base, tokenizer = load_base(ModelConfig(name="tiny", dtype="bfloat16"))
    model = with_adapters(base, AdapterConfig(r=4, alpha=8))
    perturb([p for name, p in model.named_parameters() if f".lora_B.{LAMBDA}." in name], 0.3, seed=1)
    bf16 = LMPolicy(model, tokenizer, RolloutConfig(max_new_tokens=4), chat_template=False)
    judge = Judge(bf16.trunk, tokenizer, False, dataclasses.replace(JUDGE, words=True))
    assert judge.word_reader.trunk.head.weight.dtype == torch.float32 and judge.response_reader.trunk is bf16.trunk
    words = [w for w in sorted(tokenizer.get_vocab()) if w.isalpha()][:30]
    longer = [" ".join(words[i : i + 12]) for i in range(0, 24, 4)]
    def log_odds(reader, texts):
        return reader.answer_log_odds(reader.read(judge.rests(texts)))
    for reader, moves in [(judge.word_reader, False), (judge.response_reader, True)]:
        alone = torch.cat([log_odds(reader, [w]) for w in words])
        among = log_odds(reader, words + longer)[: len(words)]
        assert (alone - among).abs().max().item() > 1e-4 if moves else torch.allclose(alone, among, atol=1e-5, rtol=0)
    # the same base, adapters off, as the bf16 one reads it, up to bf16's rounding
    with bf16.adapter(LAMBDA):
        torch.testing.assert_close(judge.score_words(words), judge.ask(words), atol=0.05, rtol=0)
    # a float32 base is not copied: read as it is, or without the autocast the run asks for
    assert Judge(policy.trunk, policy.tokenizer, False, dataclasses.replace(JUDGE, words=True)).word_reader.trunk is policy.trunk
    autocast = LMPolicy(policy.trunk.model, policy.tokenizer, RolloutConfig(max_new_tokens=4, autocast=True), chat_template=False)
    reader = Judge(autocast.trunk, policy.tokenizer, False, dataclasses.replace(JUDGE, words=True)).word_reader.trunk
    assert reader.model is autocast.trunk.model and autocast.trunk.autocasting and not reader.autocasting


ANCHORED = dataclasses.replace(JUDGE, words=True, word_margin=0.0, anchors_first=("lovely", "Kind"), anchors_second=("horrible", "mean"))


def test_anchors_add_each_words_place_between_them_in_log_odds_units(policy):
    """s(w) = log-odds(w) + weight · u · z(h_w)·d: h_w the base's state where it answers about w, z standardising
    over the neutral words and the anchors, d the first anchors' mean z minus the second's, and u the units
    that give the anchors the separation their log-odds give them."""
    judge = Judge(policy.trunk, policy.tokenizer, policy.chat_template, dataclasses.replace(ANCHORED, anchor_weight=0.5))
    reference = [*NEUTRAL_WORDS, "lovely", "kind", "horrible", "mean"]
    hidden = judge.read(reference).float()
    log_odds = judge.ask(reference)
    z = (hidden - hidden.mean(0)) / hidden.std(0)
    d = z[-4:-2].mean(0) - z[-2:].mean(0)
    units = abs(log_odds[-4:-2].mean() - log_odds[-2:].mean()) / ((z[-4:-2] @ d).mean() - (z[-2:] @ d).mean())
    words = ["dog", "walk", "the", "lovely"]
    by_hand = judge.ask(words) + 0.5 * units * ((judge.read(words).float() - hidden.mean(0)) / hidden.std(0)) @ d
    torch.testing.assert_close(judge.score_words(words), by_hand, atol=1e-4, rtol=1e-4)
    # in log-odds units: the anchor scores part the two sets as far as the base's answers do
    anchor = judge.anchor.score(hidden)
    assert (anchor[-4:-2].mean() - anchor[-2:].mean()).item() == pytest.approx(abs(log_odds[-4:-2].mean() - log_odds[-2:].mean()).item(), rel=1e-4)
    # and they enter the evidence as the log-odds do, the typical word's score taken off
    plain = Judge(policy.trunk, policy.tokenizer, policy.chat_template, dataclasses.replace(ANCHORED, anchor_weight=0.0))
    assert plain.score_words(words).tolist() == pytest.approx(judge.ask(words).tolist(), abs=1e-5)
    assert not torch.allclose(judge.word_evidence(["dog walk", "the"]), plain.word_evidence(["dog walk", "the"]))


def test_sampling_keeps_the_log_odds_with_each_rollout_and_its_rows(policy):
    TokenReward.on(policy, RewardConfig(judge=JUDGE))
    rollout = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.judged(rollout), policy.judge.log_odds(rollout.responses))
    torch.testing.assert_close(rollout.rows(slice(1, 3)).context.judged, rollout.context.judged[1:3])
    again = Rollout.from_state(rollout.state_dict(), "cpu")  # as a checkpoint's preference store keeps it
    torch.testing.assert_close(again.context.judged, rollout.context.judged)


def test_without_a_judge_no_question_is_asked(policy):
    reward = TokenReward.on(policy, RewardConfig(judge=JudgeConfig(scale=3.0)))
    assert reward.judge_weight is None and policy.judge is None and policy.sample(PROMPTS, torch.Generator().manual_seed(0)).context.judged is None


def test_the_judge_adds_its_weighted_log_odds_on_the_last_token_only(policy):
    """R_φ(τ) = Σ_h head(s_{h+1}) + w·j(τ), with w starting at `scale`; w is one of φ's weights and gets
    its gradient from the last tokens alone."""
    reward = TokenReward.on(policy, RewardConfig(judge=JUDGE))
    plain = TokenReward.on(policy, RewardConfig())
    perturb(list(reward.net.parameters()), 1.0, seed=2)
    plain.net.load_state_dict(reward.net.state_dict())
    rollout = policy.sample(PROMPTS * 2, torch.Generator().manual_seed(1))
    lengths = torch.tensor([4, 2, 1, 3, 4, 1, 2, 3])  # rows that end at the horizon, and at EOS before it
    rollout = dataclasses.replace(rollout, mask=(torch.arange(rollout.horizon) < lengths[:, None]).float())
    extra = reward.token_rewards(rollout) - plain.token_rewards(rollout)
    expected = torch.zeros_like(extra)
    expected[torch.arange(len(rollout)), lengths - 1] = 0.7 * policy.judged(rollout)
    torch.testing.assert_close(extra, expected)
    assert reward.judge_weight in reward.parameters() and reward.judge_weight.item() == pytest.approx(0.7)
    (grad,) = torch.autograd.grad(reward.token_rewards(rollout).sum(), [reward.judge_weight])
    torch.testing.assert_close(grad, policy.judged(rollout).sum())


def test_a_judge_whose_answers_begin_alike_is_a_config_error(policy):
    with pytest.raises(ConfigError, match=r"^reward\.judge\.answers: .* different tokens"):
        TokenReward.on(policy, RewardConfig(judge=JudgeConfig(question="good?", answers=("lovely", "lovely"))))


@pytest.mark.parametrize(
    "override, message",
    [
        ("reward.judge={question: ' '}", "reward.judge.question: ask the judge something"),
        ("reward.judge={question: ok, answers: [maybe]}", "reward.judge.answers: two non-empty answers"),
        ("reward.judge={question: ok, scale: -1}", "reward.judge.scale: must be ≥ 0"),
        ("reward.judge={question: ok, words: true, word_margin: -0.1}", "reward.judge.word_margin: must be ≥ 0"),
        ("reward.judge={question: ok, tone: 1}", "reward.judge.tone: unknown key"),
        ("reward.judge={question: ok, words: true, anchors_first: [good]}", "reward.judge.anchors_second: anchors need words for both answers"),
        ("reward.judge={question: ok, anchors_first: [good], anchors_second: [bad]}", "reward.judge.anchors_first: anchors score words, so they need words: true"),
        ("reward.judge={question: ok, words: true, anchors_first: [very good], anchors_second: [bad]}", "reward.judge.anchors_first: 'very good' is not one word"),
        ("reward.judge={question: ok, words: true, anchors_first: [good], anchors_second: [Good]}", "reward.judge.anchors_second: a word cannot anchor both"),
        ("reward.judge={question: ok, words: true, anchor_weight: -1}", "reward.judge.anchor_weight: must be ≥ 0"),
    ],
)
def test_a_bad_judge_field_is_a_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as error:
        parse_recipe({"prompts": {"train": "prompts.jsonl"}}, [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_resolved_recipe_with_a_judge_loads_again():
    recipe = parse_recipe({"prompts": {"train": "prompts.jsonl"}}, ["reward.judge.question=Is it kind?"])
    assert recipe.reward.judge == JudgeConfig(question="Is it kind?")
    assert parse_recipe(recipe_dict(recipe)).reward == recipe.reward


def test_probe_judge_scores_a_judge_on_the_decided_pairs_and_against_another():
    """scripts/probe_judge.py: a pair's hit is 1 where the judge's margin has the oracle's sign, ½ at a zero
    margin, ties of the oracle left out; a second judge's hits are compared with the first's pair by pair."""
    prob = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.4])  # the third pair a tie
    unit = torch.tensor([0, 0, 1, 2, 2])[decided(prob)]  # the prompt of each decided pair
    judged = torch.tensor([1.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 5.0, 1.0, 0.0])  # the firsts, then the seconds
    line, hits = probe_judge.agreement_line(judged, prob, unit, prompts=3)
    assert hits.tolist() == [1.0, 1.0, 0.0, 0.5] and line.startswith("0.625 [")
    better = torch.tensor([1.0, 0.0, 5.0, 2.0, 0.0, 0.0, 1.0, 5.0, 1.0, 1.0])
    line, hits = probe_judge.agreement_line(better, prob, unit, prompts=3, against=hits)
    assert hits.tolist() == [1.0, 1.0, 1.0, 1.0] and line.startswith("1.000 [") and "+0.375 [" in line
