"""Bits per byte: a language-model score that is comparable across tokenizers.

Definition used by every scorer here. Tokenise the text without special tokens into
t_0 .. t_{N-1}. Score every token after the first with the model's next-token distribution
given the earlier tokens of the same text:

    bpb = sum_{i >= 1} -log2 p(t_i | t_<i) / bytes

where `bytes` is the UTF-8 length of the text after the end of t_0 (the tokenizer's offsets
give that end). Because the numerator covers the same bytes whatever the tokenizer, two models
with different vocabularies are compared on equal terms.

Neural models see at most `context` tokens at once. Sliding windows of `context` tokens move
by `context // 2`, and each window scores only tokens that no earlier window scored. So every
token has between context // 2 and context - 1 tokens of context, or all earlier tokens when
fewer exist.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from somi_ray.data import as_tokenizer, vocab_size

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) int64 -> (B, T, V) float

LN2 = math.log(2.0)


@dataclass
class EvalResult:
    """Score of one model on one text."""

    bpb: float  # bits per UTF-8 byte of the scored text
    nats_per_token: float  # mean negative log-likelihood of the scored tokens
    tokens: int  # tokens scored (all but the first)
    bytes: int  # UTF-8 bytes after the end of the first token
    seconds: float = 0.0  # wall time of the scoring, model loading excluded


@dataclass
class EncodedText:
    ids: np.ndarray  # (N,) int64
    scored_bytes: int  # UTF-8 bytes after the end of the first token


def truncate_to_bytes(text: str, max_bytes: int | None) -> str:
    """Return the longest prefix of `text` that has at most `max_bytes` UTF-8 bytes."""
    if max_bytes is None:
        return text
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def encode_for_scoring(tokenizer, text: str) -> EncodedText:
    """Tokenise the whole text without special tokens and count the bytes that scoring covers."""
    encoding = as_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f"text gives {len(ids)} token(s), but bits per byte needs at least 2")

    first_end = encoding.offsets[0][1]  # in characters
    scored_bytes = len(text[first_end:].encode("utf-8"))
    if scored_bytes == 0:
        raise ValueError("no text follows the first token, so there are no bytes to score")
    return EncodedText(ids, scored_bytes)


def _result(total_nats: float, n_tokens: int, n_bytes: int, seconds: float) -> EvalResult:
    return EvalResult(
        bpb=total_nats / LN2 / n_bytes,
        nats_per_token=total_nats / n_tokens,
        tokens=n_tokens,
        bytes=n_bytes,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# Neural models through a logits function


@dataclass(frozen=True)
class ScoringWindow:
    start: int  # position of the window's first token in the text
    end: int  # one past its last token
    first_scored: int  # first position whose token this window scores


def plan_windows(n_tokens: int, context: int) -> list[ScoringWindow]:
    """Return windows of up to `context` tokens, `context // 2` apart, that score tokens 1..N-1 once each."""
    assert context >= 2, f"context must be at least 2 tokens, got {context}"
    stride = max(1, context // 2)
    windows = []
    scored_until = 1  # positions below this are scored already (position 0 is never scored)
    start = 0
    while scored_until < n_tokens:
        end = min(start + context, n_tokens)
        windows.append(ScoringWindow(start, end, scored_until))
        scored_until = end
        start += stride
    return windows


def bits_per_byte(
    logits_fn: LogitsFn,
    tokenizer,
    text: str,
    *,
    context: int = 256,
    batch_size: int = 8,
    max_bytes: int | None = None,
    prefix_ids: list[int] | None = None,
) -> EvalResult:
    """Score `text` with a causal model given as `logits_fn(ids (B, T)) -> logits (B, T, V)`.

    Windows in one batch are right-padded with token 0. Padding after the scored positions
    cannot change them in a causal model. `prefix_ids` (for example a BOS token that the model
    expects) are prepended to every window as extra context and are never scored.
    """
    started = time.perf_counter()
    text = truncate_to_bytes(text, max_bytes)
    encoded = encode_for_scoring(tokenizer, text)
    ids = torch.from_numpy(encoded.ids)
    prefix = torch.tensor(prefix_ids or [], dtype=torch.int64)
    windows = plan_windows(len(ids), context)

    total_nats = 0.0
    n_scored = 0
    for batch_start in range(0, len(windows), batch_size):
        batch = windows[batch_start : batch_start + batch_size]
        width = len(prefix) + max(w.end - w.start for w in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.int64)  # (B, T)
        for row, w in enumerate(batch):
            inputs[row, : len(prefix) + w.end - w.start] = torch.cat([prefix, ids[w.start : w.end]])

        logits = logits_fn(inputs)  # (B, T, V)
        assert logits.shape[:2] == inputs.shape, f"logits_fn returned {tuple(logits.shape)} for inputs {tuple(inputs.shape)}"

        for row, w in enumerate(batch):
            # Column c of this row contains text position w.start + c - len(prefix), and its
            # logits predict the next position.
            targets = ids[w.first_scored : w.end]  # (n,)
            columns = torch.arange(w.first_scored, w.end) - w.start + len(prefix) - 1  # (n,)
            # float64 so sums over many tokens match closed forms to about 1e-12.
            log_probs = torch.log_softmax(logits[row, columns].double(), dim=-1)  # (n, V)
            total_nats -= log_probs.gather(1, targets[:, None]).sum().item()
            n_scored += len(targets)

    assert n_scored == len(ids) - 1, f"scored {n_scored} tokens of {len(ids)}"
    return _result(total_nats, n_scored, encoded.scored_bytes, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Count-based baselines


class UnigramModel:
    """Token frequencies with add-k smoothing over the tokenizer's whole vocabulary."""

    def __init__(self, tokenizer, counts: np.ndarray, k: float):
        self.tokenizer = tokenizer
        self.counts = counts  # (V,) int64
        self.k = k
        total = counts.sum() + k * len(counts)
        self.log_probs = np.log((counts + k) / total)  # (V,) natural log

    @classmethod
    def fit(cls, tokenizer, text: str, *, k: float = 0.5) -> UnigramModel:
        assert k > 0, f"add-k smoothing needs k > 0 so unseen tokens keep probability, got {k}"
        ids = as_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids
        counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size(tokenizer))
        return cls(tokenizer, counts, k)

    def probs(self) -> np.ndarray:
        return np.exp(self.log_probs)

    def bits_per_byte(self, text: str, *, max_bytes: int | None = None) -> EvalResult:
        started = time.perf_counter()
        encoded = encode_for_scoring(self.tokenizer, truncate_to_bytes(text, max_bytes))
        total_nats = -float(self.log_probs[encoded.ids[1:]].sum())
        return _result(total_nats, len(encoded.ids) - 1, encoded.scored_bytes, time.perf_counter() - started)


class BigramModel:
    """Interpolated Kneser-Ney bigram model.

    p(w | v) = max(c(v, w) - d, 0) / c(v) + d * n(v) / c(v) * p_cont(w)

    where c(v) counts bigrams that start with v, n(v) counts distinct successors of v, and
    p_cont(w), the lower order, is the add-k smoothed share of distinct predecessors of w over
    the whole vocabulary. A context never seen in training uses p_cont alone. The discount is
    d = n1 / (n1 + 2 n2), from the numbers of bigram types seen once and twice.
    """

    def __init__(self, tokenizer, keys: np.ndarray, counts: np.ndarray, n_vocab: int, k: float):
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self.keys = keys  # (n_types,) int64 sorted, v * V + w
        self.counts = counts  # (n_types,) int64
        previous = keys // n_vocab
        following = keys % n_vocab

        n1 = int((counts == 1).sum())
        n2 = int((counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5

        self.context_counts = np.bincount(previous, weights=counts, minlength=n_vocab)  # (V,) c(v)
        self.successor_types = np.bincount(previous, minlength=n_vocab)  # (V,) n(v)
        predecessor_types = np.bincount(following, minlength=n_vocab)  # (V,)
        self.lower = (predecessor_types + k) / (predecessor_types.sum() + k * n_vocab)  # (V,) p_cont

    @classmethod
    def fit(cls, tokenizer, text: str, *, k: float = 0.5) -> BigramModel:
        assert k > 0, f"add-k smoothing needs k > 0 so unseen tokens keep probability, got {k}"
        n_vocab = vocab_size(tokenizer)
        ids = np.asarray(as_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids, dtype=np.int64)
        assert len(ids) >= 2, "fitting a bigram model needs at least 2 tokens"
        keys, counts = np.unique(ids[:-1] * n_vocab + ids[1:], return_counts=True)
        return cls(tokenizer, keys, counts, n_vocab, k)

    def _pair_counts(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        query = previous * self.n_vocab + following
        position = np.searchsorted(self.keys, query).clip(max=len(self.keys) - 1)
        return np.where(self.keys[position] == query, self.counts[position], 0)

    def prob(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """Return p(following | previous) elementwise for int64 arrays of token ids."""
        previous = np.asarray(previous, dtype=np.int64)
        following = np.asarray(following, dtype=np.int64)
        pair = self._pair_counts(previous, following)
        context = self.context_counts[previous]
        seen = context > 0
        safe_context = np.where(seen, context, 1.0)
        backoff_weight = np.where(seen, self.discount * self.successor_types[previous] / safe_context, 1.0)
        discounted = np.where(seen, np.maximum(pair - self.discount, 0.0) / safe_context, 0.0)
        return discounted + backoff_weight * self.lower[following]

    def next_token_probs(self, previous: int) -> np.ndarray:
        """Return the (V,) distribution over the token after `previous`."""
        following = np.arange(self.n_vocab, dtype=np.int64)
        return self.prob(np.full(self.n_vocab, previous, dtype=np.int64), following)

    def bits_per_byte(self, text: str, *, max_bytes: int | None = None) -> EvalResult:
        started = time.perf_counter()
        encoded = encode_for_scoring(self.tokenizer, truncate_to_bytes(text, max_bytes))
        probs = self.prob(encoded.ids[:-1], encoded.ids[1:])
        total_nats = -float(np.log(probs).sum())
        return _result(total_nats, len(encoded.ids) - 1, encoded.scored_bytes, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Teachers through transformers


def load_teacher(path: str | Path):
    """Load a teacher and its own tokenizer with transformers, in float32 on CPU.

    `path` is a .gguf file or a Hugging Face model folder. Repository code never runs
    (trust_remote_code=False). Use this only to score the teacher itself, because SOMI reads teacher
    weights with its own readers and never through an instantiated model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        folder, extra = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        folder, extra = str(path), {}
    else:
        raise FileNotFoundError(f"teacher {path} is neither a .gguf file nor a model folder")

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False, **extra)
    model.eval()
    return model, tokenizer


def default_prefix_ids(tokenizer) -> list[int]:
    """Return [bos_token_id] when the tokenizer adds BOS by default, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def score_teacher(
    model,
    tokenizer,
    text: str,
    *,
    context: int = 256,
    batch_size: int = 4,
    max_bytes: int | None = 20_000,
) -> EvalResult:
    """Score a loaded teacher (from `load_teacher`) on `text` with its own tokenizer, on CPU.

    When the tokenizer adds BOS by default, every window starts with BOS as unscored context.
    """

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits  # (B, T, V)

    with torch.inference_mode():
        return bits_per_byte(
            logits_fn,
            tokenizer,
            text,
            context=context,
            batch_size=batch_size,
            max_bytes=max_bytes,
            prefix_ids=default_prefix_ids(tokenizer),
        )


def teacher_bits_per_byte(
    path: str | Path,
    text: str,
    *,
    context: int = 256,
    batch_size: int = 4,
    max_bytes: int | None = 20_000,
) -> EvalResult:
    """Load a teacher from a .gguf file or model folder and score it on `text`.

    Loading one GGUF teacher takes tens of seconds on a few cores, and scoring runs the full
    model, so keep `max_bytes` small (the default scores the first 20 000 bytes). To score
    several texts, call `load_teacher` once and `score_teacher` per text.
    """
    started = time.perf_counter()
    model, tokenizer = load_teacher(path)
    logger.info("loaded teacher %s in %.1f s", path, time.perf_counter() - started)

    result = score_teacher(model, tokenizer, text, context=context, batch_size=batch_size, max_bytes=max_bytes)
    logger.info("teacher %s: %.4f bits per byte over %d bytes in %.1f s", path, result.bpb, result.bytes, result.seconds)
    return result
