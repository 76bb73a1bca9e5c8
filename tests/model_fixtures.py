"""Small SOMI models and byte batches of real text, shared by the structure-change tests."""

from __future__ import annotations

import numpy as np
import torch

from somi_ray.config import SomiConfig
from somi_ray.grow import grow_hidden
from somi_ray.model import SomiModel


def trained_model(hidden: int = 16, steps: int = 3, seed: int = 0) -> SomiModel:
    """Build a from-scratch model after a few learning steps on random bytes, grown to `hidden`.

    The steps move W, mass and the gains away from their start. The model is left in training mode.
    """
    torch.manual_seed(seed)
    model = SomiModel(SomiConfig.from_scratch(), seed=seed)
    optimizer = model.make_optimizer()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.learn_step(torch.randint(0, 256, (4, 17), generator=generator), optimizer)
    if hidden > model.config.hidden_size:
        grow_hidden(model, hidden)
    return model


def shakespeare_byte_batches(batch_size: int, seq_len: int, seed: int, n_bytes: int):
    """Yield windows (batch_size, seq_len + 1) of byte ids at random offsets in the first `n_bytes`
    of the Shakespeare training works."""
    from somi_ray.assets import corpus_path

    data = np.frombuffer(corpus_path("shakespeare", "train").read_bytes()[:n_bytes], dtype=np.uint8)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
        yield torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
