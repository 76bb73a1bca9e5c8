"""TeacherActor: reads one teacher lazily and streams its aligned, projected package.

The package header (vocabulary alignment, basis, token rows) comes first. The bands follow
one by one from a streaming generator, so the ModelActor can absorb band k while this actor
still projects band k + 1.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class TeacherActor:
    """One teacher, opened from a Hugging Face folder, a hub id or a GGUF file."""

    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = str(path)
        self.allow_pickle = allow_pickle
        self._reader = None
        self._basis = None
        self._operators: list | None = None  # band operators in teacher space, from prepare()

    def _open(self):
        if self._reader is None:
            from somi_ray.teachers import open_teacher

            started = time.perf_counter()
            self._reader = open_teacher(self.path, allow_pickle=self.allow_pickle)
            logger.info("opened teacher %s (%s) in %.1f s", self.path, self._reader.info.family,
                        time.perf_counter() - started)
        return self._reader

    def info(self) -> dict:
        """Family, sizes and roles, read from the files' metadata."""
        return dict(self._open().info.__dict__)

    def tokenizer_json(self) -> str:
        return self._open().tokenizer.to_str()

    def header(self, hidden_size: int, somi_tokenizer_json: str | None = None,
               somi_embedding: np.ndarray | None = None):
        """Build the package without bands: vocabulary alignment, basis and token rows in SOMI's basis.

        With no SOMI tokenizer, SOMI adopts this teacher's tokenizer. With no SOMI embedding,
        this teacher defines SOMI's basis by PCA. Otherwise it is rotated onto SOMI's basis.
        """
        from tokenizers import Tokenizer

        from somi_ray.teachers.build import build_header

        somi_tokenizer = Tokenizer.from_str(somi_tokenizer_json) if somi_tokenizer_json is not None else None
        header = build_header(self._open(), somi_tokenizer, hidden_size, somi_embedding=somi_embedding)
        self._basis = header.basis
        return header

    def prepare(self, n_parts: int) -> dict:
        """Dequantise every layer and keep each band's operator in the teacher's own space.

        This is most of the extraction work and needs no SOMI basis, so all teachers can run
        it in parallel while the ModelActor is still busy with an earlier teacher.
        """
        from somi_ray.teachers.projection import iter_band_operators

        started = time.perf_counter()
        self._operators = list(iter_band_operators(self._open(), n_parts))
        seconds = time.perf_counter() - started
        logger.info("teacher %s: %d band operators ready in %.1f s", self.path, len(self._operators), seconds)
        return {"bands": len(self._operators), "seconds": seconds}

    def stream_bands(self, n_parts: int, basis=None):
        """Yield the projected Band of each Part in order.

        `basis` is the header's basis; passing it keeps this call independent of actor state,
        so a restarted actor can replay it. Uses the operators from prepare() when they exist
        for this Part count, and reads the layers band by band otherwise.
        """
        from somi_ray.teachers.projection import iter_band_operators, project_band

        basis = basis if basis is not None else self._basis
        if basis is None:
            raise RuntimeError("stream_bands needs a basis: pass the header's basis or call header() first")
        if self._operators is not None and len(self._operators) == n_parts:
            operators = iter(self._operators)
        else:
            operators = iter_band_operators(self._open(), n_parts)
        for part, layers, operator, gains in operators:
            band = project_band(part, layers, operator, gains, basis)
            logger.info("teacher %s: band for Part %d ready (energy kept %.3f)", self.path, band.part,
                        band.energy_kept)
            yield band

    def bits_per_byte(self, texts: dict[str, str], max_bytes: int | None = 20_000, context: int = 256) -> dict:
        """Score the teacher itself on each text through transformers, in bits per byte."""
        from transformers.utils import logging as transformers_logging

        from somi_ray.evaluate import load_teacher, score_teacher

        transformers_logging.disable_progress_bar()  # one bar per tensor would flood the driver's log
        model, tokenizer = load_teacher(self.path)
        try:
            return {name: score_teacher(model, tokenizer, text, context=context, max_bytes=max_bytes).bpb
                    for name, text in texts.items()}
        finally:
            del model

    def topk_targets(self, windows: np.ndarray, somi_tokenizer_json: str, k: int, cache_root: str) -> dict:
        """Compute (or read from the cache) this teacher's top-k targets for SOMI windows (N, T+1).

        The teacher tokenises each window's decoded text with its own tokenizer; the aligned
        targets land in the cache under `cache_root`, where the ModelActor reads them, so they
        survive a restart of this actor. Returns the TargetReport as a dict.
        """
        from tokenizers import Tokenizer

        from somi_ray.distill import ApiTeacher, LocalTeacher, compute_targets

        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one bar per tensor would flood the driver's log

        def load():
            started = time.perf_counter()
            scorer = ApiTeacher(self.path) if self.path.startswith(("http://", "https://")) else LocalTeacher(self.path)
            logger.info("teacher %s loaded for top-k targets in %.1f s", self.path, time.perf_counter() - started)
            return scorer

        # The model is loaded only on a cache miss and dropped on return, because in float32 it is
        # as large as the teacher and the targets are in the cache by then.
        report = compute_targets(load, self.path, np.asarray(windows), Tokenizer.from_str(somi_tokenizer_json),
                                 cache_root, k)
        return report.as_dict()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def teacher_resources(path: str) -> dict:
    """CPU and memory requests from the teacher's file sizes.

    Reading dequantises one tensor group at a time in float32; quantised GGUF files expand
    about 8 times, safetensors in 16-bit about 2 times. The request covers the largest
    expansion of the whole file plus the interpreter, which overestimates on purpose.
    """
    p = Path(path)
    if p.is_dir():
        size = sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
        factor = 2.5
    elif p.exists():
        size = p.stat().st_size
        factor = 8.0 if p.suffix == ".gguf" else 2.5
    else:
        size, factor = 0, 1.0
    memory = int(512 * 2**20 + factor * size)
    # A quarter CPU: extraction runs in bursts, and several teachers must fit next to the
    # ModelActor on a small machine.
    return {"num_cpus": 0.25, "memory": memory}


def remote_teacher_actor(path: str, *, allow_pickle: bool = False, max_restarts: int = 2):
    """Create a TeacherActor with resource requests estimated from its files."""
    import ray

    resources = teacher_resources(path)
    return ray.remote(TeacherActor).options(
        max_restarts=max_restarts, max_task_retries=2, scheduling_strategy="SPREAD", **resources
    ).remote(path, allow_pickle)
