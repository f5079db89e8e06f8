import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.labelling import Labeller, make_labeller
from rlhf_bilevel.oracles import make_oracle, oracle_config
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.oracles.judge import LLMJudge, llm_judge_oracle
from rlhf_bilevel.oracles.pairwise import ask_as_shown, question_text

# the tiny model's vocabulary has no A or B: its judge names the responses with words it knows
TINY = dict(kind="llm-judge", model="tiny", choices=("one", "two"))
PROMPTS = ["describe your day", "tell me about the weather", "give a review"]
FIRST = ["a lovely warm day", "rain", "the best film and a great song i love"]
SECOND = ["bad", "sun and wind today and a calm bright sky", "boring"]


@pytest.fixture(scope="module")
def judge() -> LLMJudge:
    return llm_judge_oracle(oracle_config(**TINY, batch_size=4))


def test_the_question_shows_both_responses_in_order_under_their_names():
    cfg = oracle_config(kind="llm-judge", question="Which is kinder?", choices=("Left", "Right"))
    text = question_text(cfg, "the prompt", "shown first", "shown second")
    assert text.startswith("Which is kinder?\n")
    assert text.index("the prompt") < text.index("Response Left:\nshown first") < text.index("Response Right:\nshown second")
    assert text.endswith("Reply with Left or Right only.")


class ShownJudge:
    """A positional judge from a function of the question texts: P(it names the response shown first)."""

    name = "shown"
    offers = Offers.COMPARISON
    positional = True

    def __init__(self, first_named):
        self.first_named = first_named

    def compare(self, prompts, first, second):
        return ask_as_shown(self.first_named, oracle_config(kind="llm-judge"), prompts, first, second)


def test_both_orders_average_the_two_verdicts():
    cfg = oracle_config(kind="llm-judge")
    # hand-made verdicts: P(the judge names the response shown first) for each question
    verdicts = {("x", "y"): 0.9, ("y", "x"): 0.3, ("u", "v"): 0.2, ("v", "u"): 0.6}
    asked = []

    def first_named(texts):
        asked.append(len(texts))
        return torch.tensor([next(p for (a, b), p in verdicts.items() if t == question_text(cfg, "p", a, b)) for t in texts])

    prob = Labeller(ShownJudge(first_named)).ask(["p", "p"], ["x", "u"], ["y", "v"])
    torch.testing.assert_close(prob, torch.tensor([(0.9 + 1 - 0.3) / 2, (0.2 + 1 - 0.6) / 2]))
    assert asked == [4]  # one batched call for both orders


def test_a_pure_position_bias_cancels():
    always_first = Labeller(ShownJudge(lambda texts: torch.full((len(texts),), 0.85))).ask(["p"] * 3, FIRST, SECOND)
    torch.testing.assert_close(always_first, torch.full((3,), 0.5))


def test_a_biased_judge_is_unbiased_after_the_swap(judge, monkeypatch):
    """A reader with a bias b = 2 for the response shown first, on top of a quality difference d:
    after the swap P = (σ(b + d) + 1 − σ(b − d)) / 2, which is 1/2 at d = 0 and above 1/2 iff d > 0."""
    quality = {r: float(len(r.split())) for r in FIRST + SECOND}

    def biased(texts):
        out = []
        for text in texts:
            shown = [r for r in quality if f"Response one:\n{r}\n" in text] + [r for r in quality if f"Response two:\n{r}\n" in text]
            out.append(torch.sigmoid(torch.tensor(2.0 + quality[shown[0]] - quality[shown[1]])))
        return torch.stack(out)

    monkeypatch.setattr(judge, "first_named", biased)
    labeller = Labeller(judge)
    prob = labeller.ask(PROMPTS, FIRST, SECOND)
    swapped = labeller.ask(PROMPTS, SECOND, FIRST)
    torch.testing.assert_close(prob + swapped, torch.ones(3))
    torch.testing.assert_close(labeller.ask(["p"], ["rain"], ["rain"]), torch.tensor([0.5]))
    assert judge.compare(["p"], ["rain"], ["rain"]).item() > 0.8  # asked one way only, the bias decides a tie
    assert (prob[[0, 2]] > 0.5).all() and prob[1] < 0.5  # the longer response wins despite the bias


def test_tiny_judge_gives_one_probability_per_pair_and_swapping_gives_one_minus(judge):
    prob = Labeller(judge).ask(PROMPTS, FIRST, SECOND)
    assert prob.shape == (3,) and ((prob > 0) & (prob < 1)).all()
    torch.testing.assert_close(Labeller(judge).ask(PROMPTS, SECOND, FIRST), 1 - prob, atol=1e-6, rtol=0)


def test_the_verdict_is_the_softmax_of_the_two_answer_logits(judge):
    text = judge.render(question_text(judge.cfg, PROMPTS[0], FIRST[0], SECOND[0]))
    ids = judge.tokenizer(text, return_tensors="pt")["input_ids"]
    logits = judge.model(input_ids=ids).logits[0, -1]
    one, two = judge.tokenizer.convert_tokens_to_ids(["one", "two"])
    expected = F.softmax(logits[[one, two]], -1)[0]
    torch.testing.assert_close(judge.read([text]), expected.reshape(1), atol=1e-6, rtol=0)


def test_batching_and_left_padding_do_not_change_the_verdicts(judge):
    """Questions of different lengths padded together must be read as if alone."""
    unbatched = llm_judge_oracle(oracle_config(**TINY, batch_size=1)).compare(PROMPTS, FIRST, SECOND)
    torch.testing.assert_close(judge.compare(PROMPTS, FIRST, SECOND), unbatched, atol=1e-5, rtol=0)


def test_a_chat_template_is_used_when_the_tokenizer_has_one():
    model, tokenizer = tiny.build()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} reply"
    chat_judge = LLMJudge(model, tokenizer, oracle_config(**TINY))
    assert chat_judge.chat and chat_judge.render("which") == "which reply"
    prob = Labeller(chat_judge).ask(PROMPTS, FIRST, SECOND)
    torch.testing.assert_close(Labeller(chat_judge).ask(PROMPTS, SECOND, FIRST), 1 - prob, atol=1e-6, rtol=0)


def test_make_oracle_gives_a_positional_judge_without_a_gold_score():
    labeller = make_labeller(oracle_config(**TINY))
    assert labeller.oracle.positional and not labeller.offers_score
    assert labeller.ask(["p"], ["a"], ["b"]).shape == (1,)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"choices": ("A", "B")}, r"^oracle\.choices: 'A' is not in this judge's vocabulary"),
        ({"choices": ("good day", "bad")}, r"^oracle\.choices: 'good day' is 2 tokens for this judge"),
        ({"choices": ("one",)}, r"^oracle\.choices: expected two different non-blank labels"),
        ({"choices": ("one", "ONE")}, r"^oracle\.choices: expected two different"),
        ({"question": "  "}, r"^oracle\.question: must not be blank$"),
        ({"batch_size": 0}, r"^oracle\.batch_size: must be > 0, got 0$"),
        ({"model": "/no/such/judge"}, r"^oracle\.model: /no/such/judge is not a model folder"),
    ],
)
def test_judge_settings_that_cannot_work_are_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        make_oracle(oracle_config(**{**TINY, **changes}))


# -- reward-model ---------------------------------------------------------------------------------


def save_reward_model(path, num_labels=1, seed=0):
    tokenizer = tiny.tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def test_reward_model_scores_are_its_forward_pass_and_labels_are_bradley_terry(tmp_path):
    model, tokenizer = save_reward_model(tmp_path / "rm")
    oracle = make_oracle(oracle_config(kind="reward-model", model=str(tmp_path / "rm"), batch_size=2, temperature=0.5))
    prompts = ["describe your day", "tell me about the weather", "describe your day", "tell me about the weather"]
    responses = ["a lovely warm day with my family", "rain", "the best film", "sun and a calm bright sky today"]
    with torch.no_grad():
        alone = torch.stack([model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0] for p, r in zip(prompts, responses)])
    scores = oracle.score(prompts, responses)  # batches of two, right-padded: must match each read alone
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    prob = oracle.compare(prompts[:2], responses[:2], responses[2:])
    torch.testing.assert_close(prob, torch.sigmoid((alone[:2] - alone[2:]) / 0.5), atol=1e-5, rtol=0)
    assert len(set(alone.tolist())) == 4  # the scores differ, so the check above can tell the pairs apart


def test_reward_model_refuses_what_is_not_a_reward_model(tmp_path):
    with pytest.raises(ConfigError, match=r"^oracle\.model: the reward-model oracle needs a sequence-classification model"):
        make_oracle(oracle_config(kind="reward-model"))
    save_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ConfigError, match=r"^oracle\.model: '.*two' has 2 outputs; a reward model has one"):
        make_oracle(oracle_config(kind="reward-model", model=str(tmp_path / "two")))
    causal, tokenizer = tiny.build()
    causal.save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    with pytest.raises(ConfigError, match=r"^oracle\.model: '.*causal' has no trained classification head \(score\.weight"):
        make_oracle(oracle_config(kind="reward-model", model=str(tmp_path / "causal")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^oracle\.model: cannot load '.*empty' as a sequence-classification model"):
        make_oracle(oracle_config(kind="reward-model", model=str(tmp_path / "empty")))


@pytest.mark.slow
def test_smollm2_judge_prefers_the_answer_over_a_non_answer():
    prob = make_labeller(oracle_config(kind="llm-judge")).ask(
        ["What is the capital of France?", "How many legs does a spider have?"],
        ["The capital of France is Paris.", "A spider has eight legs."],
        ["I don't like talking about that.", "Bananas are yellow."],
    )
    assert (prob > 0.5).all(), prob
