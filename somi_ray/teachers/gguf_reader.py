"""Lazy reading of GGUF files: metadata, and tensors dequantised one at a time to float32."""

from __future__ import annotations

import logging
import mmap
import os

import numpy as np

from .errors import TeacherError

log = logging.getLogger(__name__)


class GGUFStore:
    """Tensors of one GGUF file, keyed by llama.cpp's tensor names."""

    def __init__(self, path: str):
        import gguf
        from gguf import quants

        self.folder = os.path.dirname(path)
        self.path = path
        self.file_bytes = os.path.getsize(path)
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise TeacherError(path, "magic", f"file starts with {magic!r}, not b'GGUF'",
                               "pass a .gguf file written by llama.cpp or gguf-py, or a Hugging Face folder")
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as error:  # gguf raises ValueError, struct.error, IndexError... on damaged files
            raise TeacherError(path, "header", f"GGUF header cannot be parsed ({type(error).__name__}: {error})",
                               "download the file again; it is truncated or damaged") from None

        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *quants._type_traits}
        for tensor in self._reader.tensors:
            if tensor.tensor_type not in supported:
                raise TeacherError(path, tensor.name, f"tensor type {tensor.tensor_type.name} cannot be "
                                   "dequantised by the installed gguf package",
                                   "re-quantise the model to a common type such as Q8_0, Q4_K or F16")

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; reversed, they are numpy's (rows, cols) = [out, in].
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

    def file_of(self, name: str) -> str:
        return self.path

    def field(self, key: str, default=None):
        """Return a metadata value (scalar, string or list), or `default` when the key is absent."""
        entry = self._reader.fields.get(key)
        if entry is None:
            return default
        return entry.contents()

    def array_length(self, key: str) -> int:
        """Return the length of an array field without decoding its items."""
        entry = self._reader.fields.get(key)
        return 0 if entry is None else len(entry.data)

    def load(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Dequantise one tensor (or some of its rows) to float32."""
        from gguf import quants

        tensor = self._tensors[name]
        data = tensor.data if rows is None else tensor.data[rows]
        log.debug("dequantising %s (%s) from %s", name, tensor.tensor_type.name, self.path)
        values = np.asarray(quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
        shape = self.shape(name) if rows is None else (len(rows), *self.shape(name)[1:])
        values = values.reshape(shape)
        self._release_pages()
        return values

    def _release_pages(self) -> None:
        # The file is memory-mapped, so pages read for a tensor stay in this process's RSS until
        # released. They are clean file pages, and MADV_DONTNEED drops them without losing data.
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._tensors = {}
        self._reader = None
