"""The causal temporal field: a per-feature leaky integrator that carries context across positions."""

from __future__ import annotations

import torch


def field_decay(mass: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-feature retention a = exp(-1 / (tau * m)); heavy features remember longer."""
    return torch.exp(-1.0 / (tau * mass))  # (H,)


def temporal_field(x: torch.Tensor, decay: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Compute r_t = a * r_{t-1} + (1 - a) * x_t for every position, with r_{-1} = 0.

    x is (B, T, H) and decay a is (H,). The scan runs in chunks: inside a chunk a (C, C, H)
    lower-triangular matrix of powers of a applies the recurrence at once, and only the
    state at each chunk boundary is carried forward, so the cost is O(B * T * C * H) with
    T / C sequential steps instead of T. Position t reads only x_0..x_t.
    """
    B, T, H = x.shape
    C = min(chunk, T)
    steps = torch.arange(C, device=x.device, dtype=x.dtype)
    lag = steps[:, None] - steps[None, :]  # (C, C), j - i
    causal = lag >= 0
    log_a = torch.log(decay.to(x.dtype)).clamp_min(-80.0)  # (H,)
    # powers[j, i, h] = a_h^(j - i) for i <= j, else 0
    powers = torch.exp(lag.clamp_min(0)[:, :, None] * log_a[None, None, :]) * causal[:, :, None]  # (C, C, H)
    carry_powers = torch.exp((steps + 1)[:, None] * log_a[None, :])  # (C, H), a^(j + 1)

    drive = (1.0 - decay.to(x.dtype)) * x  # (B, T, H)
    state = x.new_zeros(B, H)
    outputs = []
    for start in range(0, T, C):
        block = drive[:, start:start + C]  # (B, c, H)
        c = block.shape[1]
        inside = torch.einsum("jih,bih->bjh", powers[:c, :c], block)  # (B, c, H)
        out = inside + carry_powers[:c][None] * state[:, None, :]
        outputs.append(out)
        state = out[:, -1]
    return torch.cat(outputs, dim=1)  # (B, T, H)


def previous_field(r: torch.Tensor) -> torch.Tensor:
    """Shift the field by one position: position t gets r_{t-1}, position 0 gets zeros."""
    return torch.nn.functional.pad(r[:, :-1], (0, 0, 1, 0))
