"""`model.name: tiny`: a random two-layer Llama over a small English word vocabulary, built in code.

It needs no download and runs a training step in well under a second, so the whole
training path (rollouts, adapters, heads, oracles, checkpoints) can be tested on it.
Its words include sentiment-bearing ones, so the sentiment and keyword oracles have
something to reward even in a random model's output.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = """
a an the i you we they it he she this that my your our their is are was were be been
and but or so because if when then very really quite too not no yes of in on at to for
with about from by day morning evening night week weekend rain sun snow wind weather
dog cat bird neighbour friend family child teacher train bus car bike road city park
garden house kitchen room office school shop market cafe coffee tea lunch dinner food
meal book film song music game team work job meeting email phone walk trip holiday
beach lake mountain river sky tree flower street queue ride review story sentence
good great happy love lovely wonderful excellent nice fun beautiful best amazing
pleasant calm bright kind warm fresh delightful glad enjoy enjoyed perfect brilliant
bad sad terrible awful hate horrible boring worst angry ugly dull annoying cold
tired slow noisy crowded broken late ruined disappointing poor gloomy
write describe give tell share one two short long new old big small little many
some every all just still again today yesterday tomorrow always never often
""".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def config(tok: PreTrainedTokenizerFast | None = None) -> LlamaConfig:
    """The tiny model's shape, without its weights."""
    tok = tokenizer() if tok is None else tok
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,  # the default rollout's 256 prompt and 32 new tokens, with room
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def build(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config(tok))
    return model, tok
