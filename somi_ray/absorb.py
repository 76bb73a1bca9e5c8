"""Absorption: blend a teacher package into a SOMI model.

Weight-space absorption moves the teacher's token geometry (embedding and output-head rows of
shared tokens, in SOMI's basis) and its per-band coupling operators and masses into the
model. Rows are rescaled to SOMI's own statistics first, so a teacher with larger weights
cannot change the scale of the model by itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from somi_ray.model import SomiModel
from somi_ray.physics.laplacian import project_constraints

logger = logging.getLogger(__name__)

MODES = ("blend", "spectral")


class AbsorbError(ValueError):
    """A package cannot be absorbed into this model (wrong sizes, non-finite values)."""


@dataclass
class AbsorbReport:
    """Summary of one absorption: strengths, rows, bands and alignment quality."""

    teacher: str
    mode: str
    strength: float
    part_strengths: dict[int, float] = field(default_factory=dict)
    rows: int = 0  # embedding / decoder rows blended
    coverage: float = 0.0
    basis_method: str = ""
    basis_residual: float = 0.0
    energy_kept: list[float] = field(default_factory=list)  # per band
    bands_absorbed: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def check_package(model: SomiModel, package) -> None:
    """Raise AbsorbError naming the field when the package does not fit the model."""
    H, V = model.config.hidden_size, model.config.vocab_size
    source = package.info.path
    if package.embedding.shape[1] != H or package.head.shape[1] != H:
        raise AbsorbError(
            f"teacher {source}: package rows have width {package.embedding.shape[1]} but SOMI's hidden size is {H}; "
            "build the package with the model's hidden size")
    ids = np.asarray(package.vocab.somi_ids)
    if len(ids) and (ids.min() < 0 or ids.max() >= V):
        raise AbsorbError(f"teacher {source}: SOMI token ids reach {int(ids.max())}, outside the vocabulary of {V}")
    for name, array in (("embedding", package.embedding), ("head", package.head)):
        if not np.isfinite(array).all():
            raise AbsorbError(f"teacher {source}: package {name} has non-finite values; the teacher weights are damaged")
    for band in package.bands:
        check_band(model, band, source)


def check_band(model: SomiModel, band, source: str = "teacher") -> None:
    H = model.config.hidden_size
    if band.coupling.shape != (H, H) or band.mask.shape != (H, H) or band.mass.shape != (H,):
        raise AbsorbError(f"{source}: band for Part {band.part} has coupling {band.coupling.shape}, "
                          f"mask {band.mask.shape}, mass {band.mass.shape}; expected ({H}, {H}) and ({H},)")
    if not (np.isfinite(band.coupling).all() and np.isfinite(band.mass).all()):
        raise AbsorbError(f"{source}: band for Part {band.part} has non-finite coupling or mass")
    if (band.mass <= 0).any():
        raise AbsorbError(f"{source}: band for Part {band.part} has non-positive mass")


@torch.no_grad()
def absorb_rows(model: SomiModel, package, strength: float) -> int:
    """Blend the embedding, target-encoder and decoder rows of shared tokens; returns rows changed."""
    ids = torch.tensor(np.asarray(package.vocab.somi_ids), dtype=torch.long, device=model.device)
    if len(ids) == 0:
        return 0
    H = model.config.hidden_size
    embedding = torch.tensor(package.embedding, dtype=torch.float32, device=model.device)
    head = torch.tensor(package.head, dtype=torch.float32, device=model.device)

    # Scale to SOMI's statistics: embedding rows to the model's embedding RMS; decoder rows to
    # the model's decoder RMS, but at least 1/sqrt(H), where logits of a unit-RMS hidden state
    # have unit spread (a fresh decoder is initialised far smaller).
    E = model.embedding.weight
    embedding = embedding * (_rms(E) / max(_rms(embedding), 1e-12))
    decoder_rms = max(_rms(model.decoder.weight), 1.0 / math.sqrt(H))
    head = head * (decoder_rms / max(_rms(head), 1e-12))

    a = float(strength)
    E[ids] = (1.0 - a) * E[ids] + a * embedding
    model.target_embedding[ids] = (1.0 - a) * model.target_embedding[ids] + a * embedding
    D = model.decoder.weight
    D[ids] = (1.0 - a) * D[ids] + a * head
    return int(len(ids))


@torch.no_grad()
def absorb_band(model: SomiModel, band, strength: float, mode: str = "blend") -> None:
    """Blend one band's coupling and mass into its Part.

    "blend": W <- (1 - a) W + a W_band, with W_band scaled to W's mean degree and the mask
    widened to keep the absorbed edges. "spectral": the band's leading eigenmodes (largest
    eigenvalues of its coupling) are added to W with strength a, on the widened mask.
    """
    if mode not in MODES:
        raise AbsorbError(f"unknown absorption mode {mode!r}; use one of {list(MODES)}")
    if not 0 <= band.part < len(model.parts):
        raise AbsorbError(f"band targets Part {band.part} but the model has {len(model.parts)} Parts")
    c = model.config
    part = model.parts[band.part]
    coupling = torch.tensor(band.coupling, dtype=part.W.dtype, device=part.W.device)
    band_mask = torch.tensor(band.mask, dtype=torch.bool, device=part.W.device)
    mask = part.mask | band_mask
    mask.fill_diagonal_(False)

    target_degree = float(part.W.sum(1).mean())
    degree = float(coupling.sum(1).mean())
    coupling = coupling * (target_degree / degree) if degree > 0 else coupling
    a = float(strength)
    if mode == "blend":
        W = (1.0 - a) * part.W + a * coupling
    else:
        values, vectors = torch.linalg.eigh(0.5 * (coupling + coupling.T))
        k = int(c.n_modes)
        lead = vectors[:, -k:] * values[-k:].clamp_min(0.0)
        W = part.W + a * (lead @ vectors[:, -k:].T)
    part.mask.copy_(mask)
    part.W.copy_(project_constraints(W, mask, c.degree_floor, c.degree_ceiling))

    band_mass = torch.tensor(band.mass, dtype=part.mass.dtype, device=part.mass.device)
    band_mass = band_mass * (part.mass.mean() / band_mass.mean())
    part.mass.copy_(((1.0 - a) * part.mass + a * band_mass).clamp(c.mass_min, c.mass_max))
    part.invalidate()


def absorb_package(
    model: SomiModel,
    package,
    strength: float | dict[int, float] = 0.5,
    *,
    row_strength: float | None = None,
    mode: str = "blend",
) -> AbsorbReport:
    """Absorb a whole package: rows, then every band whose Part exists.

    `strength` is one blend factor in [0, 1] or a factor per Part. `row_strength` sets the
    factor for embedding and decoder rows (default: the mean Part strength). This function
    changes the model in place, so the caller keeps a copy for rollback.
    """
    check_package(model, package)
    n_parts = len(model.parts)
    per_part = strength if isinstance(strength, dict) else {p: float(strength) for p in range(n_parts)}
    for p, a in per_part.items():
        if not 0.0 <= a <= 1.0:
            raise AbsorbError(f"absorption strength for Part {p} is {a}; it must be in [0, 1]")
    mean_strength = sum(per_part.values()) / max(len(per_part), 1)
    rows_a = mean_strength if row_strength is None else float(row_strength)

    report = AbsorbReport(
        teacher=package.info.path, mode=mode, strength=mean_strength, part_strengths=dict(per_part),
        coverage=float(package.vocab.coverage), basis_method=package.basis.method,
        basis_residual=float(package.basis.residual),
    )
    report.rows = absorb_rows(model, package, rows_a)
    for band in package.bands:
        if band.part >= n_parts:
            logger.warning("skipping band for Part %d: the model has %d Parts", band.part, n_parts)
            continue
        absorb_band(model, band, per_part.get(band.part, mean_strength), mode)
        report.energy_kept.append(float(band.energy_kept))
        report.bands_absorbed += 1
    logger.info("absorbed %s: %d rows, %d bands, strength %.3f", report.teacher, report.rows,
                report.bands_absorbed, mean_strength)
    return report
