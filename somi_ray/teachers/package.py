"""Plain data that a teacher reader hands to SOMI: aligned vocabulary, basis and bands."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TeacherInfo:
    """What a teacher's files say about it, read without loading any weights."""

    path: str  # folder or .gguf file the teacher was read from
    family: str  # adapter name, e.g. "llama", "gemma3", "qwen2"
    n_layers: int
    hidden_size: int  # N, the teacher's residual width
    vocab_size: int  # rows of the embedding matrix (may include padding rows)
    tokenizer_size: int  # tokens the tokenizer defines; rows beyond it are padding
    tied_embeddings: bool  # True when the output head is the embedding matrix
    roles: dict[str, int] = field(default_factory=dict)  # role name -> tensors found
    file_bytes: int = 0  # total size of the weight files, for resource estimates


@dataclass
class VocabAlignment:
    """Token-id map between a teacher's tokenizer and SOMI's, matched by canonical strings."""

    somi_ids: np.ndarray  # (n_shared,) int64, SOMI token ids
    teacher_ids: np.ndarray  # (n_shared,) int64, the teacher ids of the same strings
    coverage: float  # share of SOMI's vocabulary that the teacher also has, in [0, 1]


@dataclass
class Basis:
    """Orthonormal map from the teacher's hidden space to SOMI's (N -> H)."""

    q: np.ndarray  # (N, H) float32 with orthonormal columns
    method: str  # "pca-gram" for the first teacher, "procrustes" for later ones
    residual: float  # relative Procrustes residual on shared tokens (0.0 for "pca-gram")
    energy_kept: float  # share of the embedding's energy inside the H kept directions
    scale: float = 1.0  # s in ||s E_t Q - E_s||; multiply E_t Q by it to match SOMI's embedding norm


@dataclass
class Band:
    """One group of consecutive teacher layers, projected into one SOMI Part."""

    part: int  # index of the SOMI Part this band is meant for
    layers: list[int]  # teacher layer indices grouped into this band
    coupling: np.ndarray  # (H, H) float32, symmetric, non-negative, zero diagonal
    mask: np.ndarray  # (H, H) bool, sparsity pattern that keeps the absorbed edges
    mass: np.ndarray  # (H,) float32, positive, mean 1, from norm gains through the basis
    energy_kept: float  # ||Q^T C Q||^2 / ||C||^2 of the band's operator, in [0, 1]
    spectrum: dict[str, float] = field(default_factory=dict)  # lowest eigenvalues, gap, rank
    energy_delivered: float = 0.0  # ||coupling||^2 / ||C||^2 before the final rescale: what reaches SOMI
    scale: float = 1.0  # mean degree divided out of `coupling`, in the teacher operator's units


@dataclass
class TeacherPackage:
    """Everything SOMI absorbs from one teacher, already in SOMI's token ids and basis."""

    info: TeacherInfo
    vocab: VocabAlignment
    basis: Basis
    embedding: np.ndarray  # (n_shared, H) float32, teacher embedding rows in SOMI's basis
    head: np.ndarray  # (n_shared, H) float32, output head rows in SOMI's basis
    bands: list[Band] = field(default_factory=list)
    seconds: float = 0.0  # wall time spent building the package
