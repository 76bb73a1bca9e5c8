"""Vocabulary alignment by canonical token strings.

Byte-level BPE (GPT-2's byte-to-unicode alphabet, `Ġ` for a space) and SentencePiece (`▁` for a
space, `<0xNN>` for raw bytes) spell the same text differently. Both are decoded to one form: the
token's UTF-8 bytes, read back as text with `surrogateescape`, so a token holding part of a
multi-byte character still has a unique, comparable string.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

from .package import VocabAlignment

BYTE_LEVEL, SENTENCEPIECE, PLAIN = "byte_level", "sentencepiece", "plain"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved
    # to code points 256 and up in byte order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def canonical_token(token: str, scheme: str, *, special: bool = False) -> str:
    """Return the token's text as SOMI compares it, with spaces as spaces and bytes decoded.

    `scheme` is "byte_level", "sentencepiece" or "plain" (taken as written). Special tokens are
    kept as written in every scheme.
    """
    if special or scheme == PLAIN:
        return token
    if scheme == BYTE_LEVEL:
        table = _unicode_to_byte()
        if not all(char in table for char in token):
            return token  # an added token outside the byte alphabet, e.g. "<|im_start|>"
        raw = bytes(table[char] for char in token)
    elif scheme == SENTENCEPIECE:
        match = _BYTE_TOKEN.match(token)
        raw = bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode("utf-8")
    else:
        raise ValueError(f"unknown tokenizer scheme {scheme!r}; expected byte_level, sentencepiece or plain")
    return raw.decode("utf-8", errors="surrogateescape")


def tokenizer_scheme(tokenizer) -> str:
    """Detect how a `tokenizers.Tokenizer` spells spaces and bytes in its vocabulary."""
    spec = json.loads(tokenizer.to_str())
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")], ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return BYTE_LEVEL
    if '"Metaspace"' in parts or "▁" in parts or (spec.get("model") or {}).get("type") == "Unigram":
        return SENTENCEPIECE
    return PLAIN


def canonical_vocab(tokenizer) -> dict[str, int]:
    """Map canonical strings to token ids; when two ids share a string the lower id is kept."""
    scheme = tokenizer_scheme(tokenizer)
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    result: dict[str, int] = {}
    for token, token_id in sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]):
        result.setdefault(canonical_token(token, scheme, special=token in special), token_id)
    return result


def align_vocab(teacher_tokenizer, somi_tokenizer) -> VocabAlignment:
    """Pair every SOMI token with the teacher token of the same canonical string."""
    teacher = canonical_vocab(teacher_tokenizer)
    somi = canonical_vocab(somi_tokenizer)
    pairs = sorted((somi_id, teacher[text]) for text, somi_id in somi.items() if text in teacher)
    somi_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    teacher_ids = np.array([p[1] for p in pairs], dtype=np.int64)
    somi_size = somi_tokenizer.get_vocab_size(with_added_tokens=True)
    return VocabAlignment(somi_ids=somi_ids, teacher_ids=teacher_ids, coverage=len(pairs) / max(somi_size, 1))


def identity_alignment(size: int) -> VocabAlignment:
    """Return the alignment used when SOMI adopts the teacher's own tokenizer."""
    ids = np.arange(size, dtype=np.int64)
    return VocabAlignment(somi_ids=ids, teacher_ids=ids.copy(), coverage=1.0)
