"""The symmetric normalised Laplacian of a Part's connectivity, and W's constraints."""

from __future__ import annotations

import torch


def degrees(W: torch.Tensor, degree_floor: float) -> torch.Tensor:
    """Row sums of W, floored so that an isolated feature never divides by zero."""
    return W.sum(dim=-1).clamp_min(degree_floor)  # (H,)


def normalized_adjacency(W: torch.Tensor, degree_floor: float) -> torch.Tensor:
    """D^-1/2 W D^-1/2 with the floored degrees D; its spectrum lies in [-1, 1]."""
    inv_sqrt = degrees(W, degree_floor).rsqrt()  # (H,)
    return inv_sqrt[:, None] * W * inv_sqrt[None, :]  # (H, H)


def normalized_laplacian(W: torch.Tensor, degree_floor: float) -> torch.Tensor:
    """L = I - D^-1/2 W D^-1/2. With D at or above the true row sums, eig(L) lies in [0, 2]."""
    H = W.shape[-1]
    return torch.eye(H, dtype=W.dtype, device=W.device) - normalized_adjacency(W, degree_floor)


def project_constraints(
    W: torch.Tensor, mask: torch.Tensor, degree_floor: float, degree_ceiling: float
) -> torch.Tensor:
    """Project W back onto its constraints.

    The result is symmetric, non-negative, zero on the diagonal and outside the mask, has
    every row sum at least `degree_floor` (rows that fell below it are lifted along their
    masked edges) and at most `degree_ceiling` (rows above it are scaled down symmetrically).
    """
    W = 0.5 * (W + W.T)
    W = W.clamp_min(0.0) * mask
    W.fill_diagonal_(0.0)

    # Lift rows whose degree fell below the floor, spreading the deficit over their edges.
    row_sum = W.sum(dim=1)
    edge_count = mask.sum(dim=1).clamp_min(1)
    deficit = (degree_floor - row_sum).clamp_min(0.0) / edge_count  # (H,)
    lift = (deficit[:, None] + deficit[None, :]) * mask
    lift.fill_diagonal_(0.0)
    W = W + lift

    # Scale heavy rows down; the geometric mean of both rows' factors keeps W symmetric.
    row_sum = W.sum(dim=1)
    factor = (degree_ceiling / row_sum.clamp_min(1e-12)).clamp(max=1.0).sqrt()
    return W * factor[:, None] * factor[None, :]


def random_graph(H: int, k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a random sparse symmetric graph with about k edges per row and unit-scale degrees.

    Returns (W, mask), both (H, H); the mask is the sparsity pattern that local learning keeps.
    """
    scores = torch.rand(H, H, generator=generator)
    scores.fill_diagonal_(-1.0)
    top = scores.topk(k, dim=1).indices  # (H, k)
    mask = torch.zeros(H, H, dtype=torch.bool)
    mask.scatter_(1, top, True)
    mask = mask | mask.T
    mask.fill_diagonal_(False)
    weights = torch.rand(H, H, generator=generator) * mask
    weights = 0.5 * (weights + weights.T)
    W = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6).mean()
    return W.float(), mask


def int8_grid(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return W on an int8 grid as (q, scale), with q int8 in [0, 127] and W ~ q * scale.

    One scale for the whole matrix keeps q symmetric, non-negative and zero wherever W is
    zero (the diagonal and outside the mask). Each weight moves by at most scale / 2, so a
    row sum can fall below the degree floor by that much per edge.
    """
    scale = (W.max().clamp_min(1e-12) / 127.0).to(W.dtype)
    q = torch.round(W / scale).clamp(0, 127).to(torch.int8)
    return q, scale


def snap_to_int8_grid(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return W moved onto its int8 grid, in W's dtype, and the grid step."""
    q, scale = int8_grid(W)
    return q.to(W.dtype) * scale, float(scale)
