"""SOMI's hidden basis from the first teacher (PCA) and later teachers' maps into it (Procrustes)."""

from __future__ import annotations

import logging

import numpy as np

from .errors import TeacherError
from .package import Basis, VocabAlignment

log = logging.getLogger(__name__)

_CHUNK_ROWS = 16384  # rows per block when accumulating (N, N) products; bounds float64 temporaries


def fit_basis(reader_or_embedding, vocab: VocabAlignment, hidden_size: int,
              somi_embedding: np.ndarray | None = None) -> Basis:
    """Fit the (N, H) map from the teacher's hidden space into SOMI's.

    With `somi_embedding` None this teacher defines the basis: the top-H principal directions of
    its embedding. Otherwise the map is the orthogonal Procrustes solution that rotates the
    teacher's shared-token rows onto SOMI's rows of the same tokens.
    """
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    if somi_embedding is None:
        embedding = _embedding(reader_or_embedding, None)
        return pca_basis(embedding, hidden_size)

    somi_embedding = np.asarray(somi_embedding, dtype=np.float32)
    if somi_embedding.ndim != 2 or somi_embedding.shape[1] != hidden_size:
        raise ValueError(f"somi_embedding must be (V_somi, {hidden_size}), got {somi_embedding.shape}")
    if len(vocab.somi_ids) == 0:
        raise TeacherError(_name(reader_or_embedding), "vocabulary", "teacher shares no token with SOMI's tokenizer",
                           "absorb this teacher with its own tokenizer, or choose a teacher with a related vocabulary")
    teacher_rows = _embedding(reader_or_embedding, vocab.teacher_ids)
    return procrustes_basis(teacher_rows, somi_embedding[vocab.somi_ids])


def pca_basis(embedding: np.ndarray, hidden_size: int) -> Basis:
    """Return the top principal directions of `embedding` (V, N) from its (N, N) covariance.

    The eigendecomposition of the N x N covariance costs O(V N^2 + N^3), where a full SVD of the
    V x N matrix costs far more memory and time for V in the hundreds of thousands.
    """
    rows, width = embedding.shape
    mean = embedding.mean(axis=0, dtype=np.float64)
    gram = gram_matrix(embedding)  # (N, N) float64, uncentred
    covariance = gram - rows * np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    kept = min(hidden_size, width)
    q = np.zeros((width, hidden_size), dtype=np.float64)
    q[:, :kept] = eigenvectors[:, order[:kept]]
    # NOTE: when H > N the last H - N SOMI features get zero columns, so Q has orthonormal rows
    # instead of orthonormal columns and those features receive nothing from this teacher.

    energy = float(np.einsum("ij,ij->", q.T @ gram, q.T) / np.trace(gram)) if np.trace(gram) > 0 else 0.0
    log.info("PCA basis: %d of %d directions keep %.3f of the embedding energy", kept, width, energy)
    return Basis(q=q.astype(np.float32), method="pca-gram", residual=0.0, energy_kept=energy)


def procrustes_basis(teacher_rows: np.ndarray, somi_rows: np.ndarray) -> Basis:
    """Return the orthonormal Q (N, H) minimising ||s E_t Q - E_s|| on shared tokens.

    The SVD is of the N x H cross-covariance E_tᵀ E_s. The scale s = trace(Σ) / ||E_t||² absorbs
    the different norms of the two embeddings; it is stored in `Basis.scale` and the residual
    ||s E_t Q - E_s|| / ||E_s|| is measured with it.
    """
    teacher = teacher_rows.astype(np.float64)
    somi = somi_rows.astype(np.float64)
    cross = teacher.T @ somi  # (N, H)
    u, sigma, vt = np.linalg.svd(cross, full_matrices=False)
    q = u @ vt  # (N, H), orthonormal columns when N >= H, orthonormal rows otherwise

    teacher_energy = float(np.sum(teacher * teacher))
    scale = float(sigma.sum() / teacher_energy) if teacher_energy > 0 else 1.0
    somi_norm = float(np.linalg.norm(somi))
    residual = float(np.linalg.norm(scale * (teacher @ q) - somi) / somi_norm) if somi_norm > 0 else 0.0
    projected = teacher @ q
    energy = float(np.sum(projected * projected) / teacher_energy) if teacher_energy > 0 else 0.0
    log.info("Procrustes basis on %d shared tokens: residual %.3f, scale %.3g, energy kept %.3f",
             len(teacher), residual, scale, energy)
    return Basis(q=q.astype(np.float32), method="procrustes", residual=residual, energy_kept=energy, scale=scale)


def gram_matrix(embedding: np.ndarray) -> np.ndarray:
    """Return EᵀE (N, N) in float64, accumulated in row blocks."""
    width = embedding.shape[1]
    gram = np.zeros((width, width), dtype=np.float64)
    for start in range(0, embedding.shape[0], _CHUNK_ROWS):
        block = embedding[start:start + _CHUNK_ROWS].astype(np.float64)
        gram += block.T @ block
    return gram


def randomized_pca(embedding: np.ndarray, hidden_size: int, *, oversample: int = 10, iterations: int = 2,
                   seed: int = 0) -> np.ndarray:
    """Return the top principal directions (N, k) by randomised SVD of the centred embedding.

    An alternative to `pca_basis` when N itself is large; used by the benchmark for comparison.
    """
    rng = np.random.default_rng(seed)
    centred = embedding - embedding.mean(axis=0, keepdims=True)
    width = embedding.shape[1]
    k = min(hidden_size + oversample, width)
    sketch = centred @ rng.standard_normal((width, k)).astype(embedding.dtype)  # (V, k)
    for _ in range(iterations):
        sketch, _ = np.linalg.qr(sketch)
        sketch = centred @ (centred.T @ sketch)
    basis, _ = np.linalg.qr(sketch)  # (V, k)
    _, _, vt = np.linalg.svd(basis.T @ centred, full_matrices=False)  # (k, N)
    return vt[:min(hidden_size, width)].T


def _embedding(source, rows: np.ndarray | None) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source if rows is None else source[rows]
    return source.embedding(rows)


def _name(source) -> str:
    return getattr(source, "path", "embedding")
