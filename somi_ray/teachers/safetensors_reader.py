"""Lazy reading of single or sharded safetensors checkpoints, one tensor at a time."""

from __future__ import annotations

import json
import logging
import os
import struct

import numpy as np

from .errors import TeacherError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> bytes per element, used to check that a header fits its file.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str) -> dict[str, dict]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise TeacherError(path, "header", f"file has {size} bytes, fewer than the 8-byte header length",
                               "download the shard again; it is truncated")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise TeacherError(path, "header", f"header length {header_len} exceeds the file size {size}",
                               "download the shard again; it is truncated or not a safetensors file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TeacherError(path, "header", f"header is not valid JSON ({error})",
                               "download the shard again; it is damaged") from None

    data_bytes = size - 8 - header_len
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in tensors.items():
        start, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPE_BYTES.get(entry["dtype"], 1)
        if end > data_bytes:
            raise TeacherError(path, name, f"tensor data ends at byte {end} but the file contains only {data_bytes} data bytes",
                               "download the shard again; it is truncated")
        if end - start != expected:
            raise TeacherError(path, name, f"tensor takes {end - start} bytes, its shape {entry['shape']} "
                               f"and dtype {entry['dtype']} need {expected}", "re-export the checkpoint")
    return tensors


class SafetensorsStore:
    """Tensor names of a checkpoint folder mapped to their shard, opened lazily with `safe_open`."""

    def __init__(self, folder: str, files: list[str]):
        self.folder = folder
        self._file_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self.file_bytes = 0
        for path in files:
            for name, entry in read_header(path).items():
                self._file_of[name] = path
                self._shape[name] = tuple(entry["shape"])
            self.file_bytes += os.path.getsize(path)

    @classmethod
    def from_folder(cls, folder: str) -> "SafetensorsStore | None":
        """Open the folder's safetensors files, following the shard index when there is one."""
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            return cls(folder, _shards_from_index(index_path))
        files = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))
        return cls(folder, files) if files else None

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def load(self, name: str) -> np.ndarray:
        """Read one tensor as float32 (bfloat16 goes through torch because numpy lacks it)."""
        from safetensors import safe_open

        path = self._file_of[name]
        log.debug("reading %s from %s", name, path)
        with safe_open(path, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.float().numpy()

    def close(self) -> None:
        pass


def _shards_from_index(index_path: str) -> list[str]:
    folder = os.path.dirname(index_path)
    try:
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TeacherError(index_path, "weight_map", f"index is not a valid shard index ({error!r})",
                           "re-export the checkpoint with save_pretrained") from None

    shards = sorted(set(weight_map.values()))
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.exists(path):
            tensor = next(name for name, file in weight_map.items() if file == shard)
            raise TeacherError(index_path, f"weight_map[{tensor!r}]", f"names shard {shard!r}, which is missing",
                               "download the missing shard into the folder")
    return [os.path.join(folder, shard) for shard in shards]


class StateDictStore:
    """An in-memory state dict, used only for opted-in pickle checkpoints."""

    def __init__(self, path: str, tensors: dict):
        self.folder = os.path.dirname(path)
        self._path = path
        self._tensors = tensors
        self.file_bytes = os.path.getsize(path)

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def file_of(self, name: str) -> str:
        return self._path

    def load(self, name: str) -> np.ndarray:
        return self._tensors[name].float().numpy()

    def close(self) -> None:
        self._tensors = {}
