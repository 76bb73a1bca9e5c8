"""Stress and the local learning rules of a Part (equilibrium propagation).

After the free settle, a second settle is nudged with strength kappa_n towards the JEPA
target z of the next token. For any parameter theta of the energy, equilibrium propagation
estimates the gradient of the prediction error as (dE/dtheta|nudged - dE/dtheta|free) / kappa_n.
For W this is the difference of co-activations, the stress tensor S; for the precision it is
the difference of squared drive errors.
"""

from __future__ import annotations

import torch


def relative_error(phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|phi - z|^2 / |z|^2 per position: the dimensionless JEPA prediction error, shape (...,)."""
    return ((phi - target) ** 2).sum(-1) / (target * target).sum(-1).clamp_min(1e-8)


def stress_tensor(
    phi_free: torch.Tensor,
    phi_nudged: torch.Tensor,
    drive: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha1: float,
    lambda_e: float,
    nudge: float,
) -> torch.Tensor:
    """S = weighted mean over positions of the co-activation change per unit nudge, (H, H).

    The energy depends on W through alpha1/2 phi^T L phi + lambda_E/2 (phi - s)^T L (phi - s)
    with L = I - D^-1/2 W D^-1/2, so both the field and its deviation from the drive
    contribute. phi_free, phi_nudged and drive are (N, H); weights is (N,) and sums to 1.
    """
    w = weights[:, None]
    free_dev = phi_free - drive
    nudged_dev = phi_nudged - drive
    field_term = (w * phi_nudged).T @ phi_nudged - (w * phi_free).T @ phi_free
    drive_term = (w * nudged_dev).T @ nudged_dev - (w * free_dev).T @ free_dev
    return (alpha1 * field_term + lambda_e * drive_term) / nudge


def connectivity_step(
    W: torch.Tensor,
    mask: torch.Tensor,
    stress: torch.Tensor,
    mass: torch.Tensor,
    *,
    lr: float,
    decay: float,
    degree_floor: float,
) -> torch.Tensor:
    """Return W + lr * S / sqrt(d_i d_j) / sqrt(m_i m_j) on the mask, minus weight decay.

    The 1/sqrt(d_i d_j) factor is the chain rule through D^-1/2 W D^-1/2 (degree changes are
    neglected); 1/sqrt(m_i m_j) is the mass-guided rate, so heavy features change slowly.
    The caller projects the result back onto W's constraints.
    """
    inv_sqrt_degree = W.sum(dim=1).clamp_min(degree_floor).rsqrt()
    inv_sqrt_mass = mass.rsqrt()
    scale = (inv_sqrt_degree * inv_sqrt_mass)[:, None] * (inv_sqrt_degree * inv_sqrt_mass)[None, :]
    return W + lr * stress * scale * mask - decay * W


def precision_step(
    precision: torch.Tensor,
    phi_free: torch.Tensor,
    phi_nudged: torch.Tensor,
    drive: torch.Tensor,
    weights: torch.Tensor,
    *,
    kappa0: float,
    nudge: float,
    lr: float,
    low: float,
    high: float,
) -> torch.Tensor:
    """Equilibrium-propagation step on the precision: dE/dPi_i = kappa0/2 (phi_i - s_i)^2."""
    w = weights[:, None]
    nudged = (w * (phi_nudged - drive) ** 2).sum(0)
    free = (w * (phi_free - drive) ** 2).sum(0)
    grad = 0.5 * kappa0 * (nudged - free) / nudge  # (H,)
    return (precision - lr * grad).clamp(low, high)


def mass_step(
    mass: torch.Tensor,
    phi_free: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    lr: float,
    low: float,
    high: float,
) -> torch.Tensor:
    """Make features that predict their target well heavier, and badly predicting ones lighter.

    Heavy features settle slowly and remember longer, so knowledge that keeps predicting
    well becomes stable. The rule moves log-mass by lr * tanh(log(mean error / error_i)),
    then rescales to keep the mean mass unchanged.
    """
    w = weights[:, None]
    error = (w * (phi_free - target) ** 2).sum(0) + 1e-8  # (H,)
    log_ratio = torch.log(error.mean() / error)
    new_mass = mass * torch.exp(lr * torch.tanh(log_ratio))
    new_mass = new_mass * (mass.mean() / new_mass.mean())
    return new_mass.clamp(low, high)
