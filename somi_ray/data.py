"""Corpora to training batches: read documents, tokenise them, cut token windows, store them in Arrow.

A window is T+1 consecutive tokens of one document: the model reads tokens 0..T-1 and predicts
tokens 1..T. Windows never span two documents. Consecutive windows of a document overlap by one
token by default (stride T), so every token after a document's first is a target exactly once,
except for the document's tail that is too short for a full window.

Window tables have the columns

    window_id    int64          unique id, stable for a given corpus, tokenizer and T
    source       string         name of the document the window was cut from
    token_start  int32          position of the window's first token in its document
    tokens       list<int32>    the T+1 token ids
    byte_length  int32          UTF-8 bytes of text covered by the T target tokens

so that sum(target loss in bits) / sum(byte_length) over all windows is bits per byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# progress(done, total) is called with bytes of text tokenised so far and in all.
ProgressCallback = Callable[[int, int], None]

WINDOW_SCHEMA = pa.schema(
    [
        pa.field("window_id", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("token_start", pa.int32()),
        pa.field("tokens", pa.list_(pa.int32())),
        pa.field("byte_length", pa.int32()),
    ]
)


@dataclass
class Document:
    """One whole work or page of a corpus."""

    name: str
    text: str


@dataclass
class TokenizedDocument:
    """Token ids of one document with the UTF-8 byte span of every token."""

    name: str
    ids: np.ndarray  # (N,) int32
    byte_starts: np.ndarray  # (N,) int64, offset of each token's first byte in the document
    byte_ends: np.ndarray  # (N,) int64, offset one past each token's last byte
    n_bytes: int  # UTF-8 bytes of the whole document


def as_tokenizer(tokenizer) -> Tokenizer:
    """Return the `tokenizers.Tokenizer` behind a transformers fast tokenizer, or the argument itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


def byte_tokenizer() -> Tokenizer:
    """Build a `tokenizers` byte-level tokenizer whose token id is the byte value (0..255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codepoints = dict(zip(printable, printable))
    extra = 0
    for byte in range(256):
        if byte not in codepoints:
            codepoints[byte] = 256 + extra
            extra += 1
    vocab = {chr(codepoints[byte]): byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def vocab_size(tokenizer) -> int:
    """Return the number of token ids the tokenizer can produce, added tokens included."""
    return as_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------
# Reading


def read_text(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8")


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Read text files as documents named by their file stem."""
    return [Document(Path(path).stem, read_text(path)) for path in paths]


def load_corpus(domain: str, split: str) -> list[Document]:
    """Read one split of a fetched corpus ("shakespeare" or "python-docs") as whole documents."""
    from somi_ray import assets

    return [Document(name, text) for name, text in assets.read_documents(domain, split)]


# ---------------------------------------------------------------------------------------------
# Tokenising


def char_to_byte_offsets(text: str) -> np.ndarray:
    """Return (len(text) + 1,) int64: the UTF-8 byte offset of every character position."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    offsets = np.zeros(len(codepoints) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    return offsets


def split_into_chunks(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """Cut text into (start, end) character ranges of at most about `chunk_chars`, ending after a newline.

    Cutting at line ends keeps chunked tokenisation equal to whole-text tokenisation for
    tokenizers whose pre-tokenizer splits at newlines. A chunk without any newline is cut at
    `chunk_chars`.
    """
    chunks = []
    start = 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        chunks.append((start, end))
        start = end
    return chunks


def tokenize_text(tokenizer, text: str, *, name: str = "", chunk_chars: int = 1 << 16) -> TokenizedDocument:
    """Tokenise one text without special tokens, in line-aligned chunks encoded as one Rust batch.

    NOTE: a chunk boundary can split a run of newlines, and then the tokens there may differ
    from those of tokenising the whole text at once. Evaluation uses whole-text tokenisation.
    """
    backend = as_tokenizer(tokenizer)
    ranges = split_into_chunks(text, chunk_chars)
    encodings = backend.encode_batch([text[start:end] for start, end in ranges], add_special_tokens=False)
    char_to_byte = char_to_byte_offsets(text)

    ids, starts, ends = [], [], []
    for (chunk_start, _), encoding in zip(ranges, encodings):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + chunk_start  # (n, 2) chars
        ids.append(np.asarray(encoding.ids, dtype=np.int32))
        starts.append(char_to_byte[offsets[:, 0]])
        ends.append(char_to_byte[offsets[:, 1]])

    def concat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return TokenizedDocument(
        name=name,
        ids=concat(ids, np.int32),
        byte_starts=concat(starts, np.int64),
        byte_ends=concat(ends, np.int64),
        n_bytes=int(char_to_byte[-1]),
    )


def tokenize_documents(
    tokenizer,
    documents: Sequence[Document],
    *,
    chunk_chars: int = 1 << 16,
    progress: ProgressCallback | None = None,
) -> list[TokenizedDocument]:
    """Tokenise documents one by one, calling progress(done_bytes, total_bytes) after each."""
    total = sum(len(doc.text.encode("utf-8")) for doc in documents)
    done = 0
    result = []
    for doc in documents:
        tokenized = tokenize_text(tokenizer, doc.text, name=doc.name, chunk_chars=chunk_chars)
        result.append(tokenized)
        done += tokenized.n_bytes
        if progress is not None:
            progress(done, total)
    return result


# ---------------------------------------------------------------------------------------------
# Windows


def build_windows(
    documents: Iterable[TokenizedDocument],
    seq_len: int,
    *,
    stride: int | None = None,
    first_window_id: int = 0,
) -> pa.Table:
    """Cut every document into windows of seq_len + 1 tokens, `stride` tokens apart (default seq_len).

    Documents shorter than seq_len + 1 tokens, and the tail of a document after its last
    full window, give no window.
    """
    assert seq_len >= 1, f"seq_len must be positive, got {seq_len}"
    stride = seq_len if stride is None else stride
    assert stride >= 1, f"stride must be positive, got {stride}"
    width = seq_len + 1

    tokens, sources, token_starts, byte_lengths = [], [], [], []
    for doc in documents:
        n_windows = 0 if len(doc.ids) < width else (len(doc.ids) - width) // stride + 1
        if n_windows == 0:
            continue
        starts = np.arange(n_windows, dtype=np.int64) * stride  # (W,)
        index = starts[:, None] + np.arange(width)  # (W, T+1)
        tokens.append(doc.ids[index].astype(np.int32).reshape(-1))

        # Targets are tokens 1..T, so the bytes run from the end of token 0 to the end of token T.
        # With stride T these spans tile the document without gaps or overlaps.
        byte_lengths.append(doc.byte_ends[starts + seq_len] - doc.byte_ends[starts])
        token_starts.append(starts)
        sources += [doc.name] * n_windows

    n = len(sources)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
    list_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    columns = [
        pa.array(np.arange(first_window_id, first_window_id + n, dtype=np.int64)),
        pa.array(sources, type=pa.string()),
        pa.array(np.concatenate(token_starts).astype(np.int32) if n else np.zeros(0, np.int32)),
        pa.ListArray.from_arrays(list_offsets, pa.array(flat, type=pa.int32())),
        pa.array(np.concatenate(byte_lengths).astype(np.int32) if n else np.zeros(0, np.int32)),
    ]
    metadata = {b"seq_len": str(seq_len).encode(), b"stride": str(stride).encode()}
    return pa.Table.from_arrays(columns, schema=WINDOW_SCHEMA.with_metadata(metadata))


def window_tokens(table: pa.Table) -> np.ndarray:
    """Return the tokens column as a (N, T+1) int32 array, without copying where Arrow allows."""
    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.int32)
    column = table.column("tokens").combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    width = int(lengths[0])
    assert (lengths == width).all(), f"windows have different lengths: {sorted(set(lengths.tolist()))[:5]}"
    values = column.flatten().to_numpy(zero_copy_only=False)  # flatten honours slices and offsets
    return values.reshape(len(column), width)


def shuffle_windows(table: pa.Table, seed: int) -> pa.Table:
    """Return the rows in an order that depends only on `seed` and the row count."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    return table.take(pa.array(order))


def iter_batches(
    table: pa.Table,
    batch_size: int,
    *,
    seed: int | None = None,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield (B, T+1) int64 batches of windows, in table order or shuffled by `seed`."""
    assert batch_size >= 1, f"batch_size must be positive, got {batch_size}"
    tokens = window_tokens(table)  # (N, T+1)
    order = np.arange(len(tokens)) if seed is None else np.random.default_rng(seed).permutation(len(tokens))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if drop_last and len(rows) < batch_size:
            return
        yield torch.from_numpy(tokens[rows].astype(np.int64))


def to_record_batches(table: pa.Table, max_rows: int) -> list[pa.RecordBatch]:
    return table.to_batches(max_chunksize=max_rows)


# ---------------------------------------------------------------------------------------------
# Arrow IPC files


def write_windows(table: pa.Table, path: str | Path, *, max_rows_per_batch: int = 4096) -> Path:
    """Write a window table as an Arrow IPC file, atomically (a partial file is renamed at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=max_rows_per_batch):
            writer.write_batch(batch)
    partial.replace(path)
    return path


def read_windows(path: str | Path, *, memory_map: bool = True) -> pa.Table:
    """Read a window table written by `write_windows`, memory-mapped by default."""
    source = pa.memory_map(str(path), "r") if memory_map else pa.OSFile(str(path), "rb")
    with source:
        table = pa.ipc.open_file(source).read_all()
    missing = set(WINDOW_SCHEMA.names) - set(table.schema.names)
    if missing:
        raise ValueError(f"{path} is not a window table: missing columns {sorted(missing)}")
    return table
