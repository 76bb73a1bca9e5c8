"""Build the whole package SOMI absorbs from one teacher: vocabulary, basis, rows and bands."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from .basis import pca_basis, procrustes_basis
from .errors import TeacherError
from .package import TeacherPackage
from .projection import iter_bands
from .sources import TeacherReader, open_teacher
from .vocab import align_vocab, identity_alignment

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def build_header(reader: TeacherReader, somi_tokenizer, hidden_size: int, *,
                 somi_embedding: np.ndarray | None = None, progress: Progress | None = None) -> TeacherPackage:
    """Align one teacher's vocabulary and basis; return the package without bands.

    The token rows (embedding and head) are in SOMI's basis. The arguments mean what they
    mean for `build_package`.
    """
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    report("vocabulary", 0, 1)
    if somi_tokenizer is None:
        vocab = identity_alignment(reader.info.tokenizer_size)
    else:
        vocab = align_vocab(reader.tokenizer, somi_tokenizer)
    if len(vocab.somi_ids) == 0:
        raise TeacherError(reader.path, "vocabulary", "teacher shares no token with SOMI's tokenizer",
                           "absorb it with its own tokenizer or pick a teacher with a related vocabulary")
    report("vocabulary", 1, 1)

    report("basis", 0, 1)
    if somi_embedding is None:
        full = reader.embedding()  # (tokenizer_size, N); padding rows already dropped
        basis = pca_basis(full, hidden_size)
        rows = full[vocab.teacher_ids]
        del full
    else:
        somi_embedding = np.asarray(somi_embedding, dtype=np.float32)
        if somi_embedding.ndim != 2 or somi_embedding.shape[1] != hidden_size:
            raise ValueError(f"somi_embedding must be (V_somi, {hidden_size}), got {somi_embedding.shape}")
        if vocab.somi_ids.max() >= len(somi_embedding):
            raise ValueError(f"SOMI token id {int(vocab.somi_ids.max())} is outside somi_embedding with "
                             f"{len(somi_embedding)} rows; pass the embedding that belongs to somi_tokenizer")
        rows = reader.embedding(vocab.teacher_ids)  # (n_shared, N)
        basis = procrustes_basis(rows, somi_embedding[vocab.somi_ids])
    embedding = (rows @ basis.q).astype(np.float32)  # (n_shared, H)
    del rows
    head = embedding if reader.info.tied_embeddings else (reader.head(vocab.teacher_ids) @ basis.q).astype(
        np.float32)
    report("basis", 1, 1)
    return TeacherPackage(info=reader.info, vocab=vocab, basis=basis, embedding=embedding, head=head,
                          bands=[], seconds=time.perf_counter() - started)


def build_package(path_or_reader, somi_tokenizer, hidden_size: int, n_parts: int, *,
                  somi_embedding: np.ndarray | None = None, progress: Progress | None = None,
                  sparsity: int | None = None) -> TeacherPackage:
    """Read, align and project one teacher into SOMI's token ids and basis.

    `somi_tokenizer` None means SOMI adopts the teacher's tokenizer (identity vocabulary map).
    `somi_embedding` None means this teacher defines SOMI's basis by PCA; otherwise it is SOMI's
    (V_somi, H) embedding and the teacher is rotated onto it by Procrustes. `progress` is called
    as progress(stage, done, total). A reader passed in stays open; a path is opened and closed.
    """
    started = time.perf_counter()
    owns_reader = isinstance(path_or_reader, (str, os.PathLike))
    reader: TeacherReader = open_teacher(path_or_reader) if owns_reader else path_or_reader
    report = progress or (lambda stage, done, total: None)
    try:
        package = build_header(reader, somi_tokenizer, hidden_size, somi_embedding=somi_embedding,
                               progress=progress)

        report("bands", 0, n_parts)
        for band in iter_bands(reader, package.basis, n_parts, sparsity=sparsity):
            package.bands.append(band)
            report("bands", len(package.bands), n_parts)

        package.seconds = time.perf_counter() - started
        log.info("built package of %s: coverage %.3f, residual %.3f, %d bands in %.1f s", reader.path,
                 package.vocab.coverage, package.basis.residual, len(package.bands), package.seconds)
        return package
    finally:
        if owns_reader:
            reader.close()
