"""Projection of teacher layers into SOMI Parts: coupling operators, masks, mass and spectra.

The coupling operator of a layer, in the teacher's hidden space (N, N), is
C = W_O · W_V (the attention OV circuit, all heads summed) + W_down · W_up (the MLP's linear
part, gate ignored). Query and key are not used: llama.cpp reorders their rows in llama-family
GGUF files, while V, O and the MLP are stored as trained in every format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from .package import Band, Basis

log = logging.getLogger(__name__)

SPECTRUM_EIGENVALUES = 6  # lowest Laplacian eigenvalues kept in a band's spectrum summary


def default_sparsity(hidden_size: int) -> int:
    """Return the edges kept per row: 2·ceil(sqrt(H)), at most H - 1."""
    return max(1, min(hidden_size - 1, 2 * math.ceil(math.sqrt(hidden_size))))


def band_layers(n_layers: int, n_parts: int) -> list[list[int]]:
    """Group layers by depth into `n_parts` contiguous bands.

    With more Parts than layers, a Part gets the layer at its relative depth, so consecutive
    Parts may share a layer.
    """
    if n_parts <= 0:
        raise ValueError(f"n_parts must be positive, got {n_parts}")
    bounds = np.linspace(0, n_layers, n_parts + 1).round().astype(int)
    bands = []
    for part in range(n_parts):
        layers = list(range(bounds[part], bounds[part + 1]))
        bands.append(layers or [min(part * n_layers // n_parts, n_layers - 1)])
    return bands


def layer_operator(tensors: dict[str, np.ndarray], head_dim: int) -> np.ndarray:
    """Return C = W_O·W_V + W_down·W_up (N, N) for one layer's tensors."""
    value, output = tensors["v"], tensors["o"]  # (n_kv·hd, N), (N, n_heads·hd)
    kv_heads = value.shape[0] // head_dim
    group = output.shape[1] // value.shape[0]
    # Grouped-query attention: each key/value head serves `group` query heads, so repeat it to
    # line up with the output projection's input columns.
    value = np.repeat(value.reshape(kv_heads, head_dim, -1), group, axis=0).reshape(output.shape[1], -1)
    operator = output @ value  # (N, N)
    operator += tensors["down"] @ tensors["up"]  # (N, I) @ (I, N)
    return operator


def project_operator(operator: np.ndarray, basis: Basis, sparsity: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Project C into SOMI's basis and make it a sparse non-negative symmetric graph.

    Returns (coupling (H, H) with mean degree 1, mask (H, H) bool, numbers), where numbers contains
    energy_kept = ||QᵀCQ||²/||C||², energy_delivered (after symmetrising, clipping and
    sparsifying, before the rescale) and the mean degree divided out.
    """
    q = basis.q.astype(np.float64)
    total = float(np.sum(operator.astype(np.float64) ** 2))
    projected = q.T @ operator @ q  # (H, H)
    kept = float(np.sum(projected ** 2))

    coupling = np.maximum(0.5 * (projected + projected.T), 0.0)
    np.fill_diagonal(coupling, 0.0)
    width = coupling.shape[0]
    k = min(sparsity, width - 1)
    top = np.argpartition(-coupling, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((width, 0), dtype=int)
    mask = np.zeros_like(coupling, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    mask |= mask.T  # the union keeps the mask symmetric
    np.fill_diagonal(mask, False)
    coupling *= mask
    delivered = float(np.sum(coupling ** 2))

    # The teacher's units mean nothing to SOMI; the graph is rescaled to mean degree 1 and the
    # factor is kept so a caller can recover the original scale.
    degree = float(coupling.sum(axis=1).mean())
    if degree > 0:
        coupling /= degree
    numbers = {
        "energy_kept": kept / total if total > 0 else 0.0,
        "energy_delivered": delivered / total if total > 0 else 0.0,
        "scale": degree if degree > 0 else 1.0,
    }
    return coupling.astype(np.float32), mask, numbers


def band_mass(gains: np.ndarray, basis: Basis) -> np.ndarray:
    """Map norm gains (N,) through the basis: diag(Qᵀ diag(|g|) Q), positive, mean 1."""
    q = basis.q.astype(np.float64)
    mass = (q * q).T @ np.abs(gains.astype(np.float64))  # (H,)
    covered = mass > 0
    if not covered.any():
        return np.ones(q.shape[1], dtype=np.float32)
    mass[~covered] = mass[covered].mean()  # SOMI features outside the teacher's span get the mean
    mass = np.maximum(mass, 1e-6 * mass.max())
    return (mass / mass.mean()).astype(np.float32)


def spectrum_summary(coupling: np.ndarray, count: int = SPECTRUM_EIGENVALUES) -> dict[str, float]:
    """Summarise the symmetric normalised Laplacian of a coupling graph.

    Returns the lowest eigenvalues, the spectral gap (second lowest minus lowest) and the
    entropy effective rank exp(-Σ p log p) with p the eigenvalues divided by their sum.
    """
    weights = coupling.astype(np.float64)
    degree = weights.sum(axis=1)
    floor = 1e-3 * max(float(degree.mean()), 1e-12)  # keeps isolated features from dividing by zero
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, floor))
    laplacian = np.eye(len(weights)) - inv_sqrt[:, None] * weights * inv_sqrt[None, :]
    eigenvalues = np.clip(np.linalg.eigvalsh(laplacian), 0.0, None)

    summary = {f"lambda_{i}": float(value) for i, value in enumerate(eigenvalues[:count])}
    summary["gap"] = float(eigenvalues[1] - eigenvalues[0]) if len(eigenvalues) > 1 else 0.0
    total = eigenvalues.sum()
    if total > 0:
        p = eigenvalues[eigenvalues > 0] / total
        summary["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    else:
        summary["effective_rank"] = 0.0
    return summary


def iter_band_operators(reader, n_parts: int) -> Iterator[tuple[int, list[int], np.ndarray, np.ndarray]]:
    """Yield (part, layers, operator (N, N), norm gains (N,)) per band, in the teacher's own space.

    This is the expensive half of extraction (dequantising every layer) and needs no SOMI
    basis, so it can run before the basis is known.
    """
    head_dim = reader.dims.head_dim
    for part, layers in enumerate(band_layers(reader.info.n_layers, n_parts)):
        operator = None
        gains = None
        for index in layers:
            tensors = reader.layer(index, roles=("v", "o", "up", "down", "input_norm"))
            layer_c = layer_operator(tensors, head_dim)
            operator = layer_c if operator is None else operator + layer_c
            gains = tensors["input_norm"] if gains is None else gains + tensors["input_norm"]
            del tensors
        operator /= len(layers)  # the band's operator is the mean of its layers'
        gains /= len(layers)
        yield part, layers, operator, gains


def project_band(part: int, layers: list[int], operator: np.ndarray, gains: np.ndarray, basis: Basis,
                 sparsity: int | None = None) -> Band:
    """Project one band's operator and gains into SOMI's basis."""
    k = default_sparsity(basis.q.shape[1]) if sparsity is None else sparsity
    coupling, mask, numbers = project_operator(operator, basis, k)
    band = Band(part=part, layers=layers, coupling=coupling, mask=mask, mass=band_mass(gains, basis),
                energy_kept=numbers["energy_kept"], spectrum=spectrum_summary(coupling),
                energy_delivered=numbers["energy_delivered"], scale=numbers["scale"])
    log.info("band %d (layers %s): energy kept %.4f, delivered %.4f", part, layers, band.energy_kept,
             band.energy_delivered)
    return band


def iter_bands(reader, basis: Basis, n_parts: int, *, sparsity: int | None = None) -> Iterator[Band]:
    """Yield one projected Band per SOMI Part, reading only that band's layers at a time."""
    for part, layers, operator, gains in iter_band_operators(reader, n_parts):
        yield project_band(part, layers, operator, gains, basis, sparsity)
