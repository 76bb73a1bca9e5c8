"""A teacher's fingerprint from its package: per-band spectrum and energy, vocabulary coverage."""

from __future__ import annotations

from .package import TeacherPackage


def teacher_fingerprint(package: TeacherPackage) -> dict:
    """Return a JSON-ready summary that the integrity and absorb steps compare across teachers."""
    info = package.info
    return {
        "path": info.path,
        "family": info.family,
        "n_layers": info.n_layers,
        "hidden_size": info.hidden_size,
        "tokenizer_size": info.tokenizer_size,
        "vocab_coverage": package.vocab.coverage,
        "shared_tokens": int(len(package.vocab.somi_ids)),
        "basis": {
            "method": package.basis.method,
            "residual": package.basis.residual,
            "energy_kept": package.basis.energy_kept,
            "scale": package.basis.scale,
        },
        "bands": [
            {
                "part": band.part,
                "layers": band.layers,
                "energy_kept": band.energy_kept,
                "energy_delivered": band.energy_delivered,
                "spectrum": band.spectrum,
            }
            for band in package.bands
        ],
        "seconds": package.seconds,
    }
