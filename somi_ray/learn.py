"""Continual learning of a checkpoint from text, outside Ray (`somi-ray learn`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class LearnOptions:
    steps: int
    batch_size: int = 8
    seq_len: int = 128
    auto_grow: bool = True
    auto_compress: bool = True
    seed: int = 0
    commit_every: int = 100  # learning steps per learn event


def _organizer(options: LearnOptions):
    """Return the self-organisation controller, or None when both automatic changes are off."""
    if not (options.auto_grow or options.auto_compress):
        return None
    try:
        from somi_ray.organize import SelfOrganizer
    except ImportError:
        logger.warning("self-organisation is not available in this build; learning without growth or compression")
        return None
    return SelfOrganizer.from_flags(auto_grow=options.auto_grow, auto_compress=options.auto_compress)


def learn_checkpoint(path: str | Path, corpus: str | Path, options: LearnOptions,
                     progress: Callable[[str], None] | None = None, bar: Callable | None = None) -> dict:
    """Learn from a text file for options.steps batches; commit a learn event every commit_every steps
    and every growth or compression as its own event."""
    from somi_ray.data import build_windows, read_text, shuffle_windows, tokenize_text, window_tokens
    from somi_ray.lineage import load_checkpoint, save_checkpoint

    say = progress or (lambda message: None)
    corpus = Path(corpus)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {corpus} is not a file; pass a UTF-8 text file")
    for name in ("steps", "batch_size", "seq_len", "commit_every"):
        value = getattr(options, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {value}")
    checkpoint = load_checkpoint(path)
    model, lineage, tokenizer = checkpoint.model, checkpoint.lineage, checkpoint.tokenizer()

    document = tokenize_text(tokenizer, read_text(corpus), name=corpus.name)
    windows = shuffle_windows(build_windows([document], options.seq_len), options.seed)
    tokens = window_tokens(windows)
    if len(tokens) < options.batch_size:
        raise ValueError(f"corpus {corpus} gives {len(tokens)} windows of {options.seq_len + 1} tokens, "
                         f"fewer than one batch of {options.batch_size}; use a longer text or a shorter --seq-len")
    say(f"learning {options.steps} steps on {len(tokens)} windows of {corpus}")

    organizer = _organizer(options)
    optimizer = model.make_optimizer()
    rng = np.random.default_rng(options.seed)
    tracker = bar(options.steps, "learning") if bar else None
    started = time.time()
    losses: list[float] = []
    chunk_start = 0
    structure_events = 0
    for step in range(options.steps):
        rows = rng.choice(len(tokens), size=options.batch_size, replace=False)
        batch = torch.from_numpy(tokens[rows].astype(np.int64))
        stats = model.learn_step(batch, optimizer)
        losses.append(stats.loss)
        if organizer is not None:
            for event in organizer.after_step(model, stats, step, batch):
                lineage.append(event["kind"], event.get("details", {}), event.get("metrics", {}),
                               bump_version=event.get("changed", True))
                save_checkpoint(path, model, checkpoint.tokenizer_json, lineage)
                structure_events += 1
            if organizer.optimizer_stale:
                optimizer = model.make_optimizer()
                organizer.optimizer_stale = False
        if tracker:
            tracker.update(1)
        if (step + 1) % options.commit_every == 0 or step + 1 == options.steps:
            chunk = losses[chunk_start:]
            lineage.append("learn", {"corpus": str(corpus), "steps": len(chunk), "batch_size": options.batch_size},
                           {"loss": float(np.mean(chunk)), "hidden_size": model.config.hidden_size,
                            "n_parts": model.config.n_parts, "parameters": model.parameter_count(),
                            "stress_loss_correlation": model.stress_loss_correlation()})
            save_checkpoint(path, model, checkpoint.tokenizer_json, lineage)
            chunk_start = len(losses)
    if tracker:
        tracker.close()
    if organizer is not None:
        # A growth still on trial is judged on the steps it had, so the saved model never
        # keeps a growth that nothing will judge later.
        for event in organizer.finish(model):
            lineage.append(event["kind"], event["details"], event["metrics"], bump_version=event["changed"])
            save_checkpoint(path, model, checkpoint.tokenizer_json, lineage)
            structure_events += 1
    return {
        "checkpoint": str(checkpoint.path),
        "version": lineage.version,
        "steps": options.steps,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-10:])),
        "structure_events": structure_events,
        "hidden_size": model.config.hidden_size,
        "n_parts": model.config.n_parts,
        "n_systems": len(model.config.routes),
        "seconds": time.time() - started,
    }
