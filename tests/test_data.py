"""Tests of tokenisation, token windows, batches and Arrow files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from somi_ray.data import (
    Document,
    build_windows,
    char_to_byte_offsets,
    iter_batches,
    read_windows,
    shuffle_windows,
    split_into_chunks,
    to_record_batches,
    tokenize_documents,
    tokenize_text,
    window_tokens,
    write_windows,
)

TEXT = (
    "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
    "When the hurlyburly's done,\nWhen the battle's lost and won.\n"
    "Über naïve café, 東京, 😀 emoji.\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return [
        Document("witches", TEXT * 6),
        Document("short", "Exeunt."),  # fewer tokens than one window
        Document("battle", (TEXT[::-1] + "\n") * 5),
    ]


def test_char_to_byte_offsets():
    text = "aé€😀b"
    offsets = char_to_byte_offsets(text)
    assert offsets.tolist() == [0, 1, 3, 6, 10, 11]
    for i in range(len(text) + 1):
        assert offsets[i] == len(text[:i].encode("utf-8"))


def test_chunks_cover_text_and_end_at_newlines():
    text = TEXT * 20
    chunks = split_into_chunks(text, 100)
    assert "".join(text[start:end] for start, end in chunks) == text
    assert all(text[end - 1] == "\n" for start, end in chunks[:-1])
    assert all(end - start <= 100 for start, end in chunks)
    assert split_into_chunks("x" * 25, 10) == [(0, 10), (10, 20), (20, 25)]


def test_chunked_tokenisation_matches_whole(tokenizer):
    text = TEXT * 30
    whole = tokenizer.encode(text, add_special_tokens=False)
    chunked = tokenize_text(tokenizer, text, name="w", chunk_chars=150)

    assert chunked.ids.dtype == np.int32
    assert chunked.ids.tolist() == whole.ids
    assert chunked.n_bytes == len(text.encode("utf-8"))
    expected_ends = [len(text[: end].encode("utf-8")) for _, end in whole.offsets]
    assert chunked.byte_ends.tolist() == expected_ends
    assert (chunked.byte_starts <= chunked.byte_ends).all()


def test_tokenize_documents_reports_progress(tokenizer, documents):
    calls = []
    tokenized = tokenize_documents(tokenizer, documents, progress=lambda done, total: calls.append((done, total)))
    total = sum(len(d.text.encode("utf-8")) for d in documents)
    assert [t.name for t in tokenized] == [d.name for d in documents]
    assert len(calls) == len(documents)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_windows_stay_inside_their_document(tokenizer, documents):
    tokenized = {t.name: t for t in tokenize_documents(tokenizer, documents)}
    seq_len = 16
    table = build_windows(tokenized.values(), seq_len, first_window_id=100)
    tokens = window_tokens(table)  # (N, T+1)

    assert tokens.shape[1] == seq_len + 1
    assert table.column("window_id").to_pylist() == list(range(100, 100 + table.num_rows))
    assert "short" not in set(table.column("source").to_pylist())
    for row, (source, start) in enumerate(zip(table.column("source").to_pylist(), table.column("token_start").to_pylist())):
        expected = tokenized[source].ids[start : start + seq_len + 1]
        assert tokens[row].tolist() == expected.tolist(), (source, start)

    for name in ("witches", "battle"):
        doc = tokenized[name]
        starts = [s for src, s in zip(table.column("source").to_pylist(), table.column("token_start").to_pylist()) if src == name]
        assert starts == list(range(0, len(doc.ids) - seq_len, seq_len))


def test_window_bytes_tile_each_document(tokenizer, documents):
    doc = tokenize_text(tokenizer, documents[0].text, name="witches")
    seq_len = 8
    table = build_windows([doc], seq_len)
    n_windows = table.num_rows
    covered = int(np.sum(table.column("byte_length").to_numpy()))
    # Windows overlap by one token, so their targets cover the bytes from the end of token 0
    # to the end of the last full window's last token without gaps.
    assert covered == doc.byte_ends[n_windows * seq_len] - doc.byte_ends[0]


def test_stride_and_schema(tokenizer, documents):
    doc = tokenize_text(tokenizer, documents[0].text, name="witches")
    table = build_windows([doc], 10, stride=4)
    assert table.column("token_start").to_pylist()[:3] == [0, 4, 8]
    assert table.schema.field("tokens").type == pa.list_(pa.int32())
    assert table.schema.metadata[b"seq_len"] == b"10"
    assert build_windows([], 10).num_rows == 0


def test_shuffle_is_deterministic(tokenizer, documents):
    table = build_windows(tokenize_documents(tokenizer, documents), 8)
    first = shuffle_windows(table, seed=7).column("window_id").to_pylist()
    again = shuffle_windows(table, seed=7).column("window_id").to_pylist()
    other = shuffle_windows(table, seed=8).column("window_id").to_pylist()
    assert first == again
    assert first != other
    assert sorted(first) == table.column("window_id").to_pylist()


def test_batches_are_long_windows(tokenizer, documents):
    table = build_windows(tokenize_documents(tokenizer, documents), 8)
    n = table.num_rows
    batches = list(iter_batches(table, 4))
    assert all(b.dtype == torch.int64 and b.shape == (4, 9) for b in batches)
    assert len(batches) == n // 4
    assert torch.equal(batches[0], torch.from_numpy(window_tokens(table)[:4].astype(np.int64)))

    all_batches = list(iter_batches(table, 4, seed=1, drop_last=False))
    assert sum(len(b) for b in all_batches) == n
    rows = sorted(map(tuple, torch.cat(all_batches).tolist()))
    assert rows == sorted(map(tuple, window_tokens(table).tolist()))
    assert [b.tolist() for b in iter_batches(table, 4, seed=1)] == [b.tolist() for b in iter_batches(table, 4, seed=1)]


def test_arrow_round_trip(tokenizer, documents, tmp_path):
    table = build_windows(tokenize_documents(tokenizer, documents), 8)
    path = write_windows(table, tmp_path / "windows" / "train.arrow", max_rows_per_batch=5)
    loaded = read_windows(path)
    assert loaded.equals(table)
    assert loaded.schema.metadata[b"seq_len"] == b"8"
    assert not (tmp_path / "windows" / "train.arrow.partial").exists()
    assert (window_tokens(loaded) == window_tokens(table)).all()

    sliced = loaded.slice(3, 4)
    assert (window_tokens(sliced) == window_tokens(table)[3:7]).all()

    batches = to_record_batches(table, 5)
    assert sum(b.num_rows for b in batches) == table.num_rows
    assert max(b.num_rows for b in batches) <= 5


def test_read_rejects_other_tables(tmp_path):
    path = tmp_path / "other.arrow"
    other = pa.table({"x": [1, 2]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, other.schema) as writer:
        writer.write_table(other)
    with pytest.raises(ValueError, match="not a window table"):
        read_windows(path)
