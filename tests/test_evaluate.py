"""Tests of bits per byte: the neural scorer, its sliding windows and the count-based baselines."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from somi_ray.evaluate import (
    BigramModel,
    UnigramModel,
    bits_per_byte,
    encode_for_scoring,
    plan_windows,
    truncate_to_bytes,
)

PARAGRAPH = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "Now are our brows bound with victorious wreaths, our bruised arms hung up for monuments, "
    "our stern alarums changed to merry meetings, our dreadful marches to delightful measures.\n"
    "Café, naïve, 東京 and emoji 😀 keep the byte counts honest.\n"
)


def train_byte_level_bpe(text: str, vocab_size: int = 320) -> Tokenizer:
    """Train a small byte-level BPE tokenizer, the same kind SmolLM2 and Qwen use."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([text] * 4, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_byte_level_bpe(PARAGRAPH)


def markov_text(n_words: int, seed: int = 0) -> str:
    """Return words where each word almost always fixes the next one: strong bigram structure."""
    words = "amber basil cedar delta ember fable garnet harbor island jasper".split()
    following = {word: words[(i + 3) % len(words)] for i, word in enumerate(words)}
    rng = random.Random(seed)
    word = words[0]
    out = []
    for _ in range(n_words):
        out.append(word)
        word = following[word] if rng.random() < 0.9 else rng.choice(words)
    return " ".join(out)


def bigram_logits_fn(model: BigramModel):
    """Wrap a bigram model's full (V, V) log-probability table as a logits function."""
    table = torch.tensor(np.log(np.stack([model.next_token_probs(v) for v in range(model.n_vocab)])))  # (V, V)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]  # (B, T, V)

    return logits_fn


def test_uniform_model_scores_log2_vocab(tokenizer):
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    calls = []

    def uniform(ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return torch.zeros(*ids.shape, vocab)

    result = bits_per_byte(uniform, tokenizer, PARAGRAPH, context=16, batch_size=3)
    encoding = tokenizer.encode(PARAGRAPH, add_special_tokens=False)
    expected_bytes = len(PARAGRAPH[encoding.offsets[0][1] :].encode("utf-8"))

    assert result.tokens == len(encoding.ids) - 1
    assert result.bytes == expected_bytes
    assert result.bpb == pytest.approx(math.log2(vocab) * result.tokens / result.bytes, rel=1e-9)
    assert result.nats_per_token == pytest.approx(math.log(vocab), rel=1e-9)
    assert all(shape[0] <= 3 and shape[1] <= 16 for shape in calls)


def test_windows_score_each_token_once():
    for n_tokens, context in [(2, 2), (10, 4), (100, 16), (17, 16), (1000, 256), (5, 256)]:
        windows = plan_windows(n_tokens, context)
        scored = [p for w in windows for p in range(w.first_scored, w.end)]
        assert scored == list(range(1, n_tokens)), (n_tokens, context)
        for w in windows:
            assert w.end - w.start <= context
            assert w.first_scored > w.start
            # Every scored token has context // 2 earlier tokens as context, or all of them near the start.
            assert w.first_scored - w.start >= min(context // 2, w.first_scored), (n_tokens, context, w)


def test_neural_scorer_matches_bigram(tokenizer):
    text = markov_text(300)
    model = BigramModel.fit(tokenizer, markov_text(2000, seed=1))
    expected = model.bits_per_byte(text)
    logits_fn = bigram_logits_fn(model)

    for context, batch_size in [(8, 1), (16, 3), (64, 8)]:
        result = bits_per_byte(logits_fn, tokenizer, text, context=context, batch_size=batch_size)
        assert result.tokens == expected.tokens
        assert result.bytes == expected.bytes
        assert result.bpb == pytest.approx(expected.bpb, rel=1e-6), (context, batch_size)


def test_prefix_ids_are_context_only(tokenizer):
    text = markov_text(100)
    model = BigramModel.fit(tokenizer, markov_text(1000, seed=2))
    logits_fn = bigram_logits_fn(model)

    plain = bits_per_byte(logits_fn, tokenizer, text, context=16)
    with_prefix = bits_per_byte(logits_fn, tokenizer, text, context=16, prefix_ids=[0])
    assert with_prefix.tokens == plain.tokens
    assert with_prefix.bpb == pytest.approx(plain.bpb, rel=1e-9)


def test_batch_padding_changes_nothing(tokenizer):
    vocab = tokenizer.get_vocab_size()

    def causal(ids: torch.Tensor) -> torch.Tensor:
        # Logits at column c depend on every token up to c, so misplaced padding or a shifted
        # window would change the score.
        cumulative = torch.cumsum(ids, dim=1).double()  # (B, T)
        return torch.sin(cumulative[..., None] * torch.arange(vocab).double() / 7.0)  # (B, T, V)

    short = PARAGRAPH[:200]
    one_per_batch = bits_per_byte(causal, tokenizer, short, context=32, batch_size=1)
    padded = bits_per_byte(causal, tokenizer, short, context=32, batch_size=4)
    assert padded.tokens == one_per_batch.tokens
    assert padded.bpb == pytest.approx(one_per_batch.bpb, rel=1e-12)


def test_max_bytes_truncates(tokenizer):
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    result = bits_per_byte(lambda ids: torch.zeros(*ids.shape, vocab), tokenizer, PARAGRAPH, max_bytes=100)
    assert result.bytes < 100
    assert len(truncate_to_bytes("東京", 4).encode("utf-8")) == 3  # never cuts a character in half


def test_single_token_text_raises(tokenizer):
    with pytest.raises(ValueError, match="at least 2"):
        encode_for_scoring(tokenizer, "a")


def test_unigram_sums_to_one(tokenizer):
    model = UnigramModel.fit(tokenizer, PARAGRAPH)
    probs = model.probs()
    assert len(probs) == tokenizer.get_vocab_size(with_added_tokens=True)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert probs.min() > 0  # add-k keeps unseen tokens possible


def test_unigram_bpb_matches_manual(tokenizer):
    model = UnigramModel.fit(tokenizer, PARAGRAPH)
    text = "the summer of our discontent"
    result = model.bits_per_byte(text)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    bits = -sum(math.log2(model.probs()[i]) for i in encoding.ids[1:])
    assert result.bpb == pytest.approx(bits / len(text[encoding.offsets[0][1] :].encode()), rel=1e-9)


def test_bigram_sums_to_one(tokenizer):
    model = BigramModel.fit(tokenizer, markov_text(500))
    seen_context = tokenizer.encode("amber", add_special_tokens=False).ids[-1]
    unseen_contexts = np.flatnonzero(model.context_counts == 0)
    assert len(unseen_contexts) > 0
    for context in [seen_context, int(unseen_contexts[0])]:
        probs = model.next_token_probs(context)
        assert probs.sum() == pytest.approx(1.0, abs=1e-9), context
        assert probs.min() > 0, context
    assert 0 < model.discount <= 1


def test_bigram_beats_unigram(tokenizer):
    train, heldout = markov_text(3000, seed=3), markov_text(500, seed=4)
    unigram = UnigramModel.fit(tokenizer, train).bits_per_byte(heldout)
    bigram = BigramModel.fit(tokenizer, train).bits_per_byte(heldout)
    assert bigram.tokens == unigram.tokens
    assert bigram.bpb < 0.8 * unigram.bpb, (bigram.bpb, unigram.bpb)
