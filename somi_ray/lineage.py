"""Lineage events and checkpoints: a SOMI model remembers every change it went through.

A checkpoint is a folder with `model.safetensors`, `config.json`, `tokenizer.json`,
`lineage.parquet` (one row per event) and `checkpoint.json` (format and version). It is
written to a staging folder beside the target and swapped in with renames, so a reader
sees either the old checkpoint or the new one, never a mix. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from somi_ray.config import SomiConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
LINEAGE_FILE = "lineage.parquet"
MANIFEST_FILE = "checkpoint.json"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, LINEAGE_FILE, MANIFEST_FILE)

EVENT_KINDS = (
    "init", "absorb", "absorb-attempt", "rollback", "learn", "grow", "compress", "restore", "note",
)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or unreadable."""


@dataclass
class Event:
    """One change in a model's history."""

    event_id: int  # position in the lineage, from 0
    version: int  # model version after the event
    kind: str  # one of EVENT_KINDS
    time: float  # Unix time in seconds
    details: dict = field(default_factory=dict)  # what was done: teacher, strength, steps, sizes
    metrics: dict = field(default_factory=dict)  # what was measured: bits per byte, parameters, stress

    def row(self) -> dict:
        return {
            "event_id": self.event_id,
            "version": self.version,
            "kind": self.kind,
            "time": self.time,
            "details": json.dumps(self.details, sort_keys=True, default=_json_default),
            "metrics": json.dumps(self.metrics, sort_keys=True, default=_json_default),
        }


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a lineage event")


LINEAGE_SCHEMA = pa.schema([
    ("event_id", pa.int64()),
    ("version", pa.int64()),
    ("kind", pa.string()),
    ("time", pa.float64()),
    ("details", pa.string()),
    ("metrics", pa.string()),
])


class Lineage:
    """The ordered list of a model's events."""

    def __init__(self, events: list[Event] | None = None):
        self.events: list[Event] = list(events or [])

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    @property
    def version(self) -> int:
        return self.events[-1].version if self.events else 0

    def append(self, kind: str, details: dict | None = None, metrics: dict | None = None,
               bump_version: bool = True) -> Event:
        """Add an event; the version rises by one unless the event changed nothing (a rollback)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown lineage event kind {kind!r}; known kinds are {list(EVENT_KINDS)}")
        event = Event(
            event_id=len(self.events),
            version=self.version + (1 if bump_version else 0),
            kind=kind,
            time=time.time(),
            details=dict(details or {}),
            metrics=dict(metrics or {}),
        )
        # Round-trip through JSON now, so an event that cannot be stored fails before it counts.
        json.dumps(event.details, default=_json_default)
        json.dumps(event.metrics, default=_json_default)
        self.events.append(event)
        return event

    def to_table(self) -> pa.Table:
        rows = [event.row() for event in self.events]
        return pa.Table.from_pylist(rows, schema=LINEAGE_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Lineage":
        events = []
        for row in table.to_pylist():
            events.append(Event(
                event_id=row["event_id"], version=row["version"], kind=row["kind"], time=row["time"],
                details=json.loads(row["details"]), metrics=json.loads(row["metrics"]),
            ))
        return cls(events)

    def copy(self) -> "Lineage":
        return Lineage.from_table(self.to_table())


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its tokenizer JSON and its lineage."""

    model: "SomiModel"  # noqa: F821
    tokenizer_json: str
    lineage: Lineage
    path: Path

    @property
    def version(self) -> int:
        return self.lineage.version

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)


def save_checkpoint(path: str | Path, model, tokenizer_json: str, lineage: Lineage) -> Path:
    """Write the checkpoint atomically: stage everything, then swap the folder in.

    A crash at any point leaves either the previous checkpoint or the new one. A crash
    between the two renames leaves the previous one under a `.old-` name, which
    `load_checkpoint` finds and restores.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.staging-{token}"
    staging.mkdir()
    try:
        state = model.checkpoint_state()
        save_file(state, str(staging / MODEL_FILE), metadata={"format": str(FORMAT_VERSION)})
        model.config.save(staging / CONFIG_FILE)
        (staging / TOKENIZER_FILE).write_text(tokenizer_json)
        pq.write_table(lineage.to_table(), staging / LINEAGE_FILE)
        manifest = {"format": FORMAT_VERSION, "version": lineage.version, "events": len(lineage),
                    "written": time.time()}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_folder(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{token}"
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("committed checkpoint %s at version %d (%d events)", target, lineage.version, len(lineage))
    return target


def _fsync_folder(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve_checkpoint_folder(path: Path) -> Path:
    if path.is_dir():
        return path
    leftovers = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers:
        logger.warning("checkpoint %s is missing; recovering the previous version from %s", path, leftovers[-1])
        os.replace(leftovers[-1], path)
        return path
    raise CheckpointError(f"checkpoint folder {path} does not exist; create one with `somi-ray init` or `somi-ray absorb`")


def checkpoint_exists(path: str | Path) -> bool:
    path = Path(path)
    return (path / MANIFEST_FILE).is_file() or any(path.parent.glob(f".{path.name}.old-*"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by `save_checkpoint`."""
    from somi_ray.model import SomiModel

    folder = _resolve_checkpoint_folder(Path(path).resolve())
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {missing}")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format {manifest.get('format')}, this somi-ray reads format {FORMAT_VERSION}"
        )
    try:
        config = SomiConfig.load(folder / CONFIG_FILE)
        state = load_file(str(folder / MODEL_FILE))
    except (ValueError, OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder} could not be read: {error}") from error

    model = SomiModel(config)
    _match_tract_shapes(model, state)
    model.load_state_dict(state, strict=True)
    model.to(device)
    lineage = Lineage.from_table(pq.read_table(folder / LINEAGE_FILE))
    if lineage.version != manifest.get("version"):
        raise CheckpointError(
            f"checkpoint {folder}: lineage ends at version {lineage.version} but the manifest records {manifest.get('version')}"
        )
    return Checkpoint(model=model, tokenizer_json=(folder / TOKENIZER_FILE).read_text(), lineage=lineage, path=folder)


def _match_tract_shapes(model, state: dict) -> None:
    """Tracts may have grown to a rank other than the cascade's; size them from the stored tensors."""
    for key, tract in model.tracts.items():
        for name in ("down", "up"):
            stored = state.get(f"tracts.{key}.{name}")
            if stored is not None and stored.shape != getattr(tract, name).shape:
                setattr(tract, name, torch.nn.Parameter(torch.zeros_like(stored)))


def load_lineage(path: str | Path) -> Lineage:
    """Read only the lineage of a checkpoint folder (no weights)."""
    folder = _resolve_checkpoint_folder(Path(path).resolve())
    file = folder / LINEAGE_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {LINEAGE_FILE}")
    return Lineage.from_table(pq.read_table(file))
