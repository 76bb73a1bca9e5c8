"""Output-space absorption: teachers' top-k next-token distributions mapped onto SOMI's windows.

A SOMI window is a row of SOMI token ids. Its text is the concatenation of the tokens'
canonical strings, so every SOMI token has a character span in that text. A teacher tokenises
the same text with its own tokenizer and predicts each of its own tokens. A prediction covers
the characters of the token it predicts.

Alignment of SOMI position t (which predicts SOMI token t+1, starting at character c):

1. Take the teacher prediction whose token covers character c. When that token starts at c,
   the boundaries agree and nothing is known of the predicted string yet. When it starts
   before c, the characters between its start and c are context SOMI has already seen.
2. Keep the teacher candidates whose string starts with those known characters and is longer,
   and strip them. Each remainder maps to the SOMI token of the same canonical string, or else
   to the longest SOMI token that is a prefix of it.
3. Merge candidates that map to the same SOMI token and renormalise over the kept ones.

Targets are stored per window as (T, k) SOMI ids (int32, -1 where empty), renormalised
log-probabilities (float16) and the teacher's confidence (its max probability) per position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 16
MIN_KEPT_MASS = 0.05  # a position whose kept candidates hold less of the teacher's top-k mass gets no target


# ---------------------------------------------------------------------------------------------
# Window text


@dataclass
class WindowText:
    """Text of one SOMI window with the character span of every token."""

    text: str
    starts: np.ndarray  # (T+1,) int64 character start of each token, -1 where it starts inside a character
    ends: np.ndarray  # (T+1,) int64 character end of each token


class SomiVocab:
    """SOMI's canonical token strings, for decoding windows and mapping teacher strings to SOMI ids."""

    def __init__(self, tokenizer):
        from somi_ray.teachers.vocab import canonical_token, canonical_vocab, tokenizer_scheme

        scheme = tokenizer_scheme(tokenizer)
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.strings: list[str] = [""] * size  # id -> canonical string ("" for special tokens)
        for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id < size and token not in special:
                self.strings[token_id] = canonical_token(token, scheme)
        self.ids = {text: i for text, i in canonical_vocab(tokenizer).items() if text and text not in special}
        self.max_length = max((len(text) for text in self.ids), default=1)
        self.hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    def lookup(self, text: str) -> int:
        """SOMI id of `text`, or of its longest prefix that is a SOMI token; -1 when none is."""
        for length in range(min(len(text), self.max_length), 0, -1):
            token_id = self.ids.get(text[:length])
            if token_id is not None:
                return token_id
        return -1

    def window_text(self, ids: np.ndarray) -> WindowText:
        """Decode one window of SOMI ids (T+1,) to text and per-token character spans."""
        pieces = [self.strings[int(i)].encode("utf-8", errors="surrogateescape") for i in ids]
        raw = b"".join(pieces)
        text = raw.decode("utf-8", errors="replace")
        starts = np.full(len(pieces), -1, dtype=np.int64)
        ends = np.zeros(len(pieces), dtype=np.int64)
        offset = 0
        for index, piece in enumerate(pieces):
            # A boundary in front of a UTF-8 continuation byte lies inside a character.
            if offset == len(raw) or not 0x80 <= raw[offset] < 0xC0:
                starts[index] = len(raw[:offset].decode("utf-8", errors="replace"))
            offset += len(piece)
            ends[index] = len(raw[:offset].decode("utf-8", errors="replace"))
        return WindowText(text, starts, ends)


def window_key(ids: np.ndarray) -> str:
    """Cache key of a window: a hash of its SOMI ids, which fix its text under one tokenizer."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Teacher predictions and alignment


@dataclass
class TeacherPredictions:
    """A teacher's predictions on one text, in its own tokens (strings, not SOMI ids)."""

    starts: list[int]  # character start of each predicted token's string
    ends: list[int]  # character end of each predicted token
    tokens: list[str]  # canonical string of each predicted token
    candidates: list[list[tuple[str, float]]]  # top-k (canonical string, log-prob) per prediction
    teacher_tokens: int = 0  # tokens the teacher ran over, context included


@dataclass
class WindowTargets:
    """Aligned targets of one window: T SOMI positions, k candidates each."""

    ids: np.ndarray  # (T, k) int32 SOMI token ids, -1 where empty
    logprobs: np.ndarray  # (T, k) float16 renormalised teacher log-probabilities
    confidence: np.ndarray  # (T,) float16 teacher's max probability, 0 where no target

    @property
    def covered(self) -> np.ndarray:
        return self.ids[:, 0] >= 0


def prediction_spans(tokens: list[str], ends: list[int]) -> list[int]:
    """Character start of each predicted token's canonical string: its offset end minus its length.

    A SentencePiece token such as "▁the" carries a space that its offsets may leave out. Counting
    back from the end puts that space where SOMI's own token " the" starts.
    """
    return [end - len(token) for token, end in zip(tokens, ends)]


def align_window(window: WindowText, predictions: TeacherPredictions, vocab: SomiVocab,
                 k: int = DEFAULT_TOP_K) -> WindowTargets:
    """Map a teacher's predictions onto the T positions of one SOMI window."""
    T = len(window.starts) - 1
    ids = np.full((T, k), -1, dtype=np.int32)
    logprobs = np.zeros((T, k), dtype=np.float16)
    confidence = np.zeros(T, dtype=np.float16)
    ends = np.asarray(predictions.ends, dtype=np.int64)

    for t in range(T):
        c = int(window.starts[t + 1])
        if c < 0:
            continue
        index = int(np.searchsorted(ends, c, side="right"))  # first prediction ending after c
        if index >= len(ends) or predictions.starts[index] > c:
            continue
        known = predictions.tokens[index][:c - predictions.starts[index]]

        merged: dict[int, float] = {}
        total = 0.0
        for string, logprob in predictions.candidates[index]:
            total += math.exp(logprob)
            if len(string) <= len(known) or not string.startswith(known):
                continue
            # NOTE: a remainder that is a proper prefix of longer SOMI tokens keeps all its mass on the
            # SOMI token of exactly that string; the share of the longer tokens is not split off.
            somi_id = vocab.lookup(string[len(known):])
            if somi_id < 0:
                continue
            merged[somi_id] = float(np.logaddexp(merged.get(somi_id, -np.inf), logprob))
        if not merged:
            continue
        kept = np.array(list(merged.values()))
        if total <= 0 or np.exp(kept).sum() / total < MIN_KEPT_MASS:
            continue

        order = np.argsort(-kept)[:k]
        chosen = kept[order]
        ids[t, :len(order)] = np.array(list(merged.keys()))[order]
        logprobs[t, :len(order)] = chosen - np.logaddexp.reduce(chosen)
        confidence[t] = math.exp(max(lp for _, lp in predictions.candidates[index]))
    return WindowTargets(ids, logprobs, confidence)


# ---------------------------------------------------------------------------------------------
# Teachers: local weights through transformers, or an OpenAI-compatible completions API


class LocalTeacher:
    """A teacher loaded with transformers; tokenises raw text with its own tokenizer."""

    def __init__(self, path: str, model=None, tokenizer=None):
        from somi_ray.data import as_tokenizer
        from somi_ray.evaluate import default_prefix_ids, load_teacher
        from somi_ray.teachers.vocab import canonical_token, tokenizer_scheme

        if model is None:
            model, tokenizer = load_teacher(path)
        self.path = str(path)
        self.model, self.tokenizer = model, tokenizer
        backend = as_tokenizer(tokenizer)
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        scheme = tokenizer_scheme(backend)
        special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        self.strings = [""] * self.vocab_size  # teacher id -> canonical string, "" for special tokens
        for token, token_id in backend.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size and token not in special:
                self.strings[token_id] = canonical_token(token, scheme)
        self.prefix = default_prefix_ids(tokenizer)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The teacher's own token ids and character offsets of `text`, without special tokens."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), list(encoding.offsets)

    def forward(self, batch: list[list[int]]):
        """Log-probabilities (B, L, V) of padded id rows; the model sees only its own ids."""
        import torch

        width = max(len(row) for row in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, values in enumerate(batch):
            ids[row, :len(values)] = torch.tensor(values)
            mask[row, :len(values)] = 1
        assert int(ids.max()) < self.vocab_size, f"id {int(ids.max())} is outside the teacher's {self.vocab_size}"
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, L, V')
        return torch.log_softmax(logits[..., :self.vocab_size].float(), dim=-1)

    def predict(self, texts: list[str], k: int) -> list[TeacherPredictions]:
        """Top-k predictions of every token of each text (the first one too when a BOS leads)."""
        import torch

        encoded = [self.encode(text) for text in texts]
        rows = [self.prefix + ids for ids, _ in encoded]
        # Keep the (B, L, V) logits near 50 M floats: a 262k vocabulary gets small batches.
        per_batch = max(1, int(5e7 // (self.vocab_size * max(len(r) for r in rows))))
        results = []
        for first in range(0, len(rows), per_batch):
            logprobs = self.forward(rows[first:first + per_batch])
            top_values, top_ids = torch.topk(logprobs, k, dim=-1)  # (B, L, k)
            for row in range(logprobs.shape[0]):
                ids, offsets = encoded[first + row]
                skip = 0 if self.prefix else 1  # without BOS the first token has no prediction
                tokens, ends, candidates = [], [], []
                for j in range(skip, len(ids)):
                    position = len(self.prefix) + j - 1  # logits at the token before j
                    tokens.append(self.strings[ids[j]])
                    ends.append(int(offsets[j][1]))
                    candidates.append([(self.strings[int(i)], float(v)) for i, v in
                                       zip(top_ids[row, position], top_values[row, position]) if self.strings[int(i)]])
                results.append(TeacherPredictions(prediction_spans(tokens, ends), ends, tokens, candidates,
                                                  teacher_tokens=len(rows[first + row])))
        return results


class ApiTeacher:
    """A teacher known only by an OpenAI-compatible `/v1/completions` endpoint with echo and logprobs."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.path = self.base_url

    def _post(self, body: dict) -> dict:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{self.base_url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"teacher endpoint {self.base_url} returned {error.code}: "
                               f"{error.read().decode(errors='replace')[:300]}") from None

    def predict(self, texts: list[str], k: int) -> list[TeacherPredictions]:
        """Score each text as a prompt (echo) and read the top-k log-probabilities of its tokens."""
        results = []
        for text in texts:
            body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": k}
            if self.model:
                body["model"] = self.model
            logprobs = self._post(body)["choices"][0]["logprobs"]
            tokens, starts, ends, candidates = [], [], [], []
            for token, offset, top in zip(logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"]):
                if top is None or offset >= len(text):  # the first token, or the generated one
                    continue
                tokens.append(token)
                starts.append(int(offset))
                ends.append(int(offset) + len(token))
                candidates.append(sorted(top.items(), key=lambda item: -item[1]))
            results.append(TeacherPredictions(starts, ends, tokens, candidates, teacher_tokens=len(logprobs["tokens"])))
        return results


def teacher_key(source: str) -> str:
    """Cache key of a teacher: its resolved path with the size and mtime of its files, or its URL."""
    if source.startswith(("http://", "https://")):
        # NOTE: an endpoint whose model keeps learning changes its outputs under the same key.
        return "api-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    path = Path(source).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stamp = [str(path)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Cache


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def default_cache_root(checkpoint: str | None = None) -> Path:
    """`<checkpoint parent>/somi-targets` when a checkpoint is given, else ~/.cache/somi-ray/targets."""
    if checkpoint:
        return Path(checkpoint).resolve().parent / "somi-targets"
    return Path(os.path.expanduser("~/.cache/somi-ray/targets"))


class TargetCache:
    """Aligned targets of one teacher for one SOMI tokenizer and k, as Parquet shards in one folder."""

    def __init__(self, root: str | Path, teacher: str, tokenizer_hash: str, k: int):
        self.folder = Path(root) / teacher / tokenizer_hash / f"k{k}"
        self.k = k
        self.entries: dict[str, WindowTargets] = {}
        self.stats = CacheStats()
        self._load()

    def _load(self) -> None:
        import pyarrow.parquet as pq

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.parquet")):
            table = pq.read_table(shard)
            keys = table.column("window").to_pylist()
            ids = np.stack(table.column("ids").to_numpy(zero_copy_only=False)).astype(np.int32)
            logprobs = np.stack(table.column("logprobs").to_numpy(zero_copy_only=False)).astype(np.float16)
            confidence = np.stack(table.column("confidence").to_numpy(zero_copy_only=False)).astype(np.float16)
            rows = table.column("positions").to_pylist()
            for key, row_ids, row_lp, row_conf, T in zip(keys, ids, logprobs, confidence, rows):
                self.entries[key] = WindowTargets(row_ids.reshape(T, self.k), row_lp.reshape(T, self.k), row_conf)
        logger.info("target cache %s holds %d windows", self.folder, len(self.entries))

    def get(self, key: str) -> WindowTargets | None:
        found = self.entries.get(key)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, targets: dict[str, WindowTargets]) -> None:
        """Write new windows as one shard; the rename makes a half-written shard invisible."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not targets:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = list(targets)
        table = pa.table({
            "window": pa.array(keys, type=pa.string()),
            "positions": pa.array([len(targets[key].ids) for key in keys], type=pa.int32()),
            "ids": pa.array([targets[key].ids.reshape(-1) for key in keys], type=pa.list_(pa.int32())),
            "logprobs": pa.array([targets[key].logprobs.reshape(-1) for key in keys], type=pa.list_(pa.float16())),
            "confidence": pa.array([targets[key].confidence for key in keys], type=pa.list_(pa.float16())),
        })
        temporary = self.folder / f".{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, compression="zstd")
        temporary.rename(self.folder / f"{uuid.uuid4().hex}.parquet")
        self.entries.update(targets)


@dataclass
class TargetReport:
    """What one target computation did, for one teacher."""

    teacher: str
    windows: int = 0
    computed: int = 0  # windows run through the teacher (cache misses)
    positions: int = 0  # SOMI positions in the windows
    covered: int = 0  # SOMI positions that received a target
    teacher_tokens: int = 0  # tokens the teacher ran over
    seconds: float = 0.0  # teacher forward passes and alignment
    hit_rate: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        return self.covered / self.positions if self.positions else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.teacher_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return dict(teacher=self.teacher, windows=self.windows, computed=self.computed, positions=self.positions,
                    covered=self.covered, coverage=self.coverage, teacher_tokens=self.teacher_tokens,
                    seconds=self.seconds, tokens_per_second=self.tokens_per_second, hit_rate=self.hit_rate)


def compute_targets(teacher, source: str, windows: np.ndarray, somi_tokenizer, cache_root: str | Path,
                    k: int = DEFAULT_TOP_K, batch_size: int = 8) -> TargetReport:
    """Targets of `teacher` for every window (N, T+1) of SOMI ids, computed on a cache miss only.

    `teacher` has `predict(texts, k)`, or is a function that returns such an object. The
    function is called only when a window misses the cache, so a fully cached run loads no model.
    """
    vocab = SomiVocab(somi_tokenizer)
    cache = TargetCache(cache_root, teacher_key(source), vocab.hash, k)
    report = TargetReport(teacher=source, windows=len(windows))
    keys = [window_key(row) for row in windows]
    missing = [i for i, key in enumerate(keys) if cache.get(key) is None]
    started = time.perf_counter()
    if missing and not hasattr(teacher, "predict"):
        teacher = teacher()
    for first in range(0, len(missing), batch_size):
        chunk = missing[first:first + batch_size]
        texts = [vocab.window_text(windows[i]) for i in chunk]
        predictions = teacher.predict([w.text for w in texts], k)
        new = {}
        for i, window, prediction in zip(chunk, texts, predictions):
            new[keys[i]] = align_window(window, prediction, vocab, k)
            report.teacher_tokens += prediction.teacher_tokens
        cache.put(new)
    report.seconds = time.perf_counter() - started
    report.computed = len(missing)
    report.hit_rate = 1.0 - len(missing) / max(len(windows), 1)
    for key in keys:
        targets = cache.entries[key]
        report.positions += len(targets.ids)
        report.covered += int(targets.covered.sum())
    logger.info("targets of %s: %d windows, %d computed, coverage %.3f, %.0f teacher tokens/s", source,
                report.windows, report.computed, report.coverage, report.tokens_per_second)
    return report


# ---------------------------------------------------------------------------------------------
# Loss


def stack_targets(per_window: list[WindowTargets | None], T: int, k: int):
    """Tensors (B, T, k) ids and log-probs and (B, T) confidence; windows without targets stay empty."""
    import torch

    ids = torch.full((len(per_window), T, k), -1, dtype=torch.long)
    logprobs = torch.zeros(len(per_window), T, k)
    confidence = torch.zeros(len(per_window), T)
    for row, targets in enumerate(per_window):
        if targets is None:
            continue
        ids[row] = torch.from_numpy(targets.ids.astype(np.int64))
        logprobs[row] = torch.from_numpy(targets.logprobs.astype(np.float32))
        confidence[row] = torch.from_numpy(targets.confidence.astype(np.float32))
    return ids, logprobs, confidence


def distillation_loss(logits, ids, logprobs, confidence, token_stress=None, weight: float = 1.0):
    """Weighted KL(teacher top-k, renormalised || SOMI) per position, averaged over covered positions.

    logits (B, T, V); ids and logprobs (B, T, k) with -1 ids for empty slots; confidence (B, T);
    token_stress (B, T) or None. A position weighs confidence * stress / mean stress (stress
    clamped to [0.5, 2] of its mean), so SOMI learns most where it is surprised and the teacher
    is sure.
    """
    import torch

    valid = ids >= 0  # (B, T, k)
    covered = valid[..., 0]  # (B, T)
    if not bool(covered.any()):
        return logits.sum() * 0.0
    somi = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.clamp_min(0).to(logits.device))  # (B, T, k)
    teacher = logprobs.to(logits.device)
    q = teacher.exp() * valid
    kl = (q * (teacher - somi)).sum(-1)  # (B, T)

    position_weight = confidence.to(logits.device) * covered
    if token_stress is not None:
        relative = token_stress / token_stress.mean().clamp_min(1e-8)
        position_weight = position_weight * relative.clamp(0.5, 2.0).to(logits.device)
    return weight * (position_weight * kl).sum() / covered.sum()
