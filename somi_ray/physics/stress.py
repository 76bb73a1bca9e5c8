"""Stress and the local learning rules of a Part (equilibrium propagation).

After the free settle, a second settle is nudged with strength kappa_n towards the JEPA
target z of the next token. For any parameter theta of the energy, equilibrium propagation
estimates the gradient of the prediction error as (dE/dtheta|nudged - dE/dtheta|free) / kappa_n.
For W this is the difference of co-activations, the stress tensor S; for the precision it is
the difference of squared drive errors. The input coupling U instead takes a delta-rule step
through the Part's own linear response (`coupling_step`).
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
    grad: torch.Tensor,
    mass: torch.Tensor,
    *,
    lr: float,
    decay: float,
    degree_floor: float,
) -> torch.Tensor:
    """Return W after one descent step along the equilibrium-propagation gradient, on the mask.

    The step is normalised so that its root-mean-square over the mask is lr times the mean
    edge weight: the rate means the same at any scale of the fields. Each edge (i, j) is
    then scaled by sqrt(mean mass^2 / (m_i m_j)), so heavy features change slowly. The
    caller projects the result back onto W's constraints.
    """
    masked = grad * mask
    edges = mask.sum().clamp_min(1)
    grad_rms = (masked.pow(2).sum() / edges).sqrt()
    mean_edge = (W * mask).sum() / edges
    step_scale = lr * mean_edge.clamp_min(degree_floor / max(W.shape[0], 1)) / grad_rms.clamp_min(1e-12)
    inv_sqrt_mass = (mass.mean() / mass).sqrt()
    mass_scale = inv_sqrt_mass[:, None] * inv_sqrt_mass[None, :]
    return W - step_scale * masked * mass_scale - decay * W


def precision_step(
    precision: torch.Tensor, grad: torch.Tensor, *, lr: float, low: float, high: float
) -> torch.Tensor:
    """Descent step on the precision along its equilibrium-propagation gradient.

    Like the connectivity step, it moves the precision by lr times its mean per step in
    root-mean-square terms, then clamps it to [low, high].
    """
    grad_rms = grad.pow(2).mean().sqrt().clamp_min(1e-12)
    return (precision - lr * precision.mean() * grad / grad_rms).clamp(low, high)


def mass_step(mass: torch.Tensor, errors: torch.Tensor, *, lr: float, low: float, high: float) -> torch.Tensor:
    """Make features that predict their target well heavier, and badly predicting ones lighter.

    errors is the weighted mean squared JEPA error per feature (H,). Heavy features settle
    slowly and remember longer, so knowledge that keeps predicting well becomes stable.
    log-mass moves by lr * tanh(log(mean error / error_i)); the mean mass is kept.
    """
    errors = errors + 1e-8
    log_ratio = torch.log(errors.mean() / errors)
    new_mass = mass * torch.exp(lr * torch.tanh(log_ratio))
    new_mass = new_mass * (mass.mean() / new_mass.mean())
    return new_mass.clamp(low, high)


def coupling_step(
    coupling: torch.Tensor,
    grad: torch.Tensor,
    batch_moments: torch.Tensor,
    running_moments: torch.Tensor,
    response: torch.Tensor,
    mass: torch.Tensor,
    *,
    lr: float,
    decay: float,
) -> torch.Tensor:
    """Descent step on the input coupling U that removes a share lr of the batch's error along it.

    The prediction error is quadratic in U: 1/2 sum_t w |R (s + U s) - z|^2, with R the
    settle's linear response and C = sum_t w s s^T the drive's second moment (`batch_moments`).
    The direction is the gradient preconditioned by the running second moment over recent
    batches (a whitened delta rule), so every drive direction moves at the same rate
    whatever the drive's scale and correlations. Rows of heavy features are scaled by
    sqrt(mean mass / m_i), capped at 1, so they move more slowly. The length is lr times
    the exact minimiser of the batch's quadratic along that direction, so any lr in (0, 2)
    lowers the batch's error, however stale the running moments are.
    """
    H = running_moments.shape[0]
    ridge = 1e-3 * torch.diagonal(running_moments).mean().clamp_min(1e-8)
    eye = torch.eye(H, dtype=running_moments.dtype, device=running_moments.device)
    row_scale = (mass.mean() / mass).sqrt().clamp(max=1.0)
    direction = -row_scale[:, None] * torch.linalg.solve(running_moments + ridge * eye, grad.T).T
    moved = response @ direction  # (H, H), change of the field per unit drive
    curvature = (moved @ batch_moments * moved).sum()
    slope = (grad * direction).sum()
    length = (-slope / curvature.clamp_min(1e-12)).clamp_min(0.0)
    return coupling * (1.0 - decay) + lr * length * direction


def operator_energy_gradient(op, psi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d/dÃ of the weighted sum of 1/2 psi^T Â psi, as an (H, H) matrix in psi coordinates.

    Â = lambda_bar I + sum_k (lambda_k - lambda_bar) u_k u_k^T keeps the K lowest modes of Ã
    and gives the rest their mean eigenvalue. First-order perturbation of that operator:
    pairs of kept modes respond as the exact operator would (1/2 c_j c_k); the complement
    only feels the trace, spread evenly over its diagonal; a kept mode k and a complement
    mode j couple with the factor (lambda_k - lambda_bar) / (lambda_k - lambda_j). Learning
    rules built on this match what the settle actually computes.
    """
    U = op.all_modes  # (H, H)
    lam = op.all_eigenvalues  # (H,)
    H = U.shape[0]
    K = op.modes.shape[1]
    lam_bar = op.complement_eigenvalue

    c = psi @ U  # (N, H) mode coordinates
    moments = c.T @ (weights[:, None] * c)  # (H, H)
    g = torch.zeros_like(moments)
    g[:K, :K] = 0.5 * moments[:K, :K]
    perp = torch.diagonal(moments)[K:].sum()
    idx = torch.arange(K, H, device=psi.device)
    g[idx, idx] = 0.5 * perp / (H - K)
    gap = lam[:K][None, :] - lam[K:][:, None]  # (H-K, K), lambda_k - lambda_j
    safe_gap = torch.where(gap.abs() > 1e-9, gap, torch.full_like(gap, -1e-9))
    factor = (lam[:K][None, :] - lam_bar) / safe_gap
    cross = 0.5 * factor * moments[K:, :K]
    g[K:, :K] = cross
    g[:K, K:] = cross.T
    return U @ g @ U.T


def connectivity_gradient(
    W: torch.Tensor,
    op,
    psi: torch.Tensor,
    drive: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha1: float,
    lambda_e: float,
    degree_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dE/dW and dE/dA_diag of the settle's energy at fixed states, summed over weighted positions.

    E depends on W through Ã = M^-1/2 ((alpha1 + lambda_E) L + diag) M^-1/2 and through the
    drive term -lambda_E phi^T L s. Returns (grad_W (H, H), grad_A_diag (H,)), where the
    second is the derivative with respect to the diagonal of A (used for the precision).
    """
    from somi_ray.physics.laplacian import normalized_laplacian

    inv_sqrt_mass = op.inv_sqrt_mass
    g_tilde = operator_energy_gradient(op, psi, weights)
    g_a = inv_sqrt_mass[:, None] * g_tilde * inv_sqrt_mass[None, :]  # dE/dA
    phi = psi * inv_sqrt_mass
    cross = phi.T @ (weights[:, None] * drive)  # (H, H), sum_t w phi s^T
    g_l = (alpha1 + lambda_e) * g_a - lambda_e * 0.5 * (cross + cross.T)

    with torch.enable_grad():
        W_var = W.detach().clone().requires_grad_(True)
        L = normalized_laplacian(W_var, degree_floor)
        (grad_w,) = torch.autograd.grad((g_l.detach() * L).sum(), W_var)
    diag_a = torch.diagonal(g_a) - (weights[:, None] * phi * drive).sum(0)
    return 0.5 * (grad_w + grad_w.T), diag_a
