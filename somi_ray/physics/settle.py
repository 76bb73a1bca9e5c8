"""Settling of a Part's field: closed form per eigenmode, then symplectic tanh corrections.

The field phi (H features) of every position obeys

    M phi'' + beta M phi' = -A phi + b - (tanh(phi) - phi),
    A = (alpha1 + lambda_E) L + (alpha0 + 1) I + kappa0 Pi (+ kappa_n I when nudged),
    b = lambda_E L s + kappa0 Pi s (+ kappa_n z when nudged),

with M = diag(mass), Pi = diag(precision), s the drive, z the nudge target and L the
symmetric normalised Laplacian. The "+1" is the linearisation of tanh; the remainder
tanh(phi) - phi is applied by the correction steps. Damping proportional to mass (beta M)
lets psi = M^1/2 phi decouple into modes of the symmetric operator Ã = M^-1/2 A M^-1/2:

    psi'' + beta psi' = -Ã psi + M^-1/2 b.

The K lowest eigenpairs of Ã are kept; the orthogonal complement follows one oscillator
whose eigenvalue is the mean of the remaining eigenvalues, so no part of the drive is
dropped. Applying that operator costs O(H K) per position, and so does each correction step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from somi_ray.physics.laplacian import normalized_laplacian


@dataclass
class SettleOperator:
    """Eigen cache of one Part's settling operator, for the free or the nudged phase."""

    modes: torch.Tensor  # (H, K) orthonormal eigenvectors of Ã, lowest eigenvalues first
    eigenvalues: torch.Tensor  # (K,)
    all_modes: torch.Tensor  # (H, H) every eigenvector, for learning rules and diagnostics
    all_eigenvalues: torch.Tensor  # (H,) ascending
    complement_eigenvalue: float  # mean of the H - K remaining eigenvalues
    inv_sqrt_mass: torch.Tensor  # (H,)
    laplacian: torch.Tensor  # (H, H), used once per settle to form the drive
    drive_gain: torch.Tensor  # (H,) kappa0 * precision
    lambda_e: float
    nudge: float  # kappa_n of this phase; 0 for the free phase
    damping: float
    settle_time: float
    correction_dt: float
    n_corrections: int

    @classmethod
    def build(
        cls,
        W: torch.Tensor,
        mass: torch.Tensor,
        precision: torch.Tensor,
        *,
        alpha1: float,
        lambda_e: float,
        alpha0: float,
        kappa0: float,
        degree_floor: float,
        n_modes: int,
        damping: float,
        settle_time: float,
        correction_dt: float,
        n_corrections: int,
        nudge: float = 0.0,
    ) -> "SettleOperator":
        """Eigen-decompose Ã in float64 and keep the K lowest modes."""
        H = W.shape[0]
        L = normalized_laplacian(W.double(), degree_floor)  # (H, H)
        diag = (alpha0 + 1.0 + nudge) + kappa0 * precision.double()  # (H,)
        A = (alpha1 + lambda_e) * L + torch.diag(diag)
        inv_sqrt_mass = mass.double().rsqrt()
        A_tilde = inv_sqrt_mass[:, None] * A * inv_sqrt_mass[None, :]
        A_tilde = 0.5 * (A_tilde + A_tilde.T)
        eigenvalues, vectors = torch.linalg.eigh(A_tilde)  # ascending
        K = min(n_modes, H - 1)
        kept = eigenvalues[:K]
        complement = float((torch.diagonal(A_tilde).sum() - kept.sum()) / (H - K))
        dtype = W.dtype
        return cls(
            modes=vectors[:, :K].to(dtype).contiguous(),
            eigenvalues=kept.to(dtype),
            all_modes=vectors.to(dtype),
            all_eigenvalues=eigenvalues.to(dtype),
            complement_eigenvalue=complement,
            inv_sqrt_mass=inv_sqrt_mass.to(dtype),
            laplacian=L.to(dtype),
            drive_gain=(kappa0 * precision).to(dtype),
            lambda_e=lambda_e,
            nudge=nudge,
            damping=damping,
            settle_time=settle_time,
            correction_dt=correction_dt,
            n_corrections=n_corrections,
        )

    def apply(self, psi: torch.Tensor) -> torch.Tensor:
        """Â psi with the K kept modes and the shared complement oscillator, O(H K)."""
        coeffs = psi @ self.modes  # (..., K)
        inside = coeffs @ self.modes.T  # (..., H)
        return (coeffs * self.eigenvalues) @ self.modes.T + self.complement_eigenvalue * (psi - inside)

    def drive(self, s: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """b̃ = M^-1/2 (lambda_E L s + kappa0 Pi s + kappa_n z), shape (..., H)."""
        b = self.lambda_e * (s @ self.laplacian) + self.drive_gain * s  # L is symmetric
        if self.nudge > 0.0:
            if target is None:
                raise ValueError("a nudged settle needs a target")
            b = b + self.nudge * target
        return self.inv_sqrt_mass * b

    def to(self, dtype: torch.dtype) -> "SettleOperator":
        """Return a copy whose tensors have the given dtype (float64 for reference checks)."""
        changes = {f.name: getattr(self, f.name).to(dtype) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def linear_energy(self, psi: torch.Tensor, velocity: torch.Tensor, b_tilde: torch.Tensor) -> torch.Tensor:
        """Hamiltonian of the linear phase per position: kinetic + 1/2 psi Â psi - b̃ psi, shape (...,).

        The closed form integrates exactly this system, and the damping makes it fall
        monotonically (dE/dt = -beta |psi'|^2).
        """
        kinetic = 0.5 * (velocity * velocity).sum(-1)
        return kinetic + 0.5 * (psi * self.apply(psi)).sum(-1) - (b_tilde * psi).sum(-1)

    def energy(self, psi: torch.Tensor, velocity: torch.Tensor, b_tilde: torch.Tensor) -> torch.Tensor:
        """Hamiltonian per position: kinetic + quadratic + drive + tanh potentials, shape (...,)."""
        phi = psi * self.inv_sqrt_mass
        kinetic = 0.5 * (velocity * velocity).sum(-1)
        quadratic = 0.5 * (psi * self.apply(psi)).sum(-1) - (b_tilde * psi).sum(-1)
        return kinetic + quadratic + _tanh_remainder_potential(phi).sum(-1)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - 0.6931471805599453


def _tanh_remainder_potential(phi: torch.Tensor) -> torch.Tensor:
    """Potential of tanh(phi) - phi, whose linear part the closed form already includes."""
    return _log_cosh(phi) - 0.5 * phi * phi


def mode_response(eigenvalue: torch.Tensor, damping: float, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """G(t) and G'(t) of x'' + beta x' + lambda x = 0 with x(0) = 1, x'(0) = 0.

    G = e^(-beta t/2) (C + beta/2 S), G' = -lambda e^(-beta t/2) S, where C = cos(w t) and
    S = sin(w t) / w with w^2 = lambda - beta^2 / 4 (cosh and sinh when w^2 < 0, C = 1 and
    S = t at w = 0). The envelope is folded into the exponentials so nothing overflows.
    """
    lam = eigenvalue.double()
    half = 0.5 * damping
    disc = lam - half * half
    omega = disc.abs().sqrt()
    envelope = torch.exp(torch.full_like(lam, -half * t))
    safe_omega = torch.where(omega > 1e-6, omega, torch.ones_like(omega))

    under_c = envelope * torch.cos(omega * t)
    under_s = envelope * torch.sin(omega * t) / safe_omega
    grow = torch.exp((omega - half) * t)
    shrink = torch.exp((-omega - half) * t)
    over_c = 0.5 * (grow + shrink)
    over_s = 0.5 * (grow - shrink) / safe_omega

    c = torch.where(disc >= 0, under_c, over_c)
    s = torch.where(disc >= 0, under_s, over_s)
    c = torch.where(omega > 1e-6, c, envelope)
    s = torch.where(omega > 1e-6, s, envelope * t)
    return c + half * s, -lam * s


def linear_settle(
    op: SettleOperator, b_tilde: torch.Tensor, psi0: torch.Tensor, t: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form state (psi, psi') at time t of the linear phase, starting at rest at psi0."""
    t = op.settle_time if t is None else t
    dtype = b_tilde.dtype
    gain, rate = mode_response(op.eigenvalues, op.damping, t)  # (K,)
    c_gain, c_rate = mode_response(torch.tensor([op.complement_eigenvalue]), op.damping, t)
    gain, rate = gain.to(dtype), rate.to(dtype)
    c_gain, c_rate = float(c_gain), float(c_rate)

    f_modes = b_tilde @ op.modes  # (..., K)
    start_modes = psi0 @ op.modes  # (..., K)
    rest_modes = f_modes / op.eigenvalues
    dev_modes = start_modes - rest_modes
    psi_modes = rest_modes + gain * dev_modes
    vel_modes = rate * dev_modes

    f_perp = b_tilde - f_modes @ op.modes.T  # (..., H)
    start_perp = psi0 - start_modes @ op.modes.T
    rest_perp = f_perp / op.complement_eigenvalue
    dev_perp = start_perp - rest_perp
    psi = psi_modes @ op.modes.T + rest_perp + c_gain * dev_perp
    velocity = vel_modes @ op.modes.T + c_rate * dev_perp
    return psi, velocity


@dataclass
class SettleResult:
    """Final field of a settle and what the energy did along the way."""

    phi: torch.Tensor  # (..., H) settled field
    energies: list[torch.Tensor]  # Hamiltonian per position after the linear phase and each correction
    rejected: int  # correction steps rejected by the energy guard, summed over positions


def settle(
    op: SettleOperator,
    s: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    noise_std: float = 0.0,
    track_energy: bool = False,
) -> SettleResult:
    """Settle the field for drive s (..., H): closed-form linear phase, then tanh corrections.

    The field starts at rest at the drive (phi = s). Each correction is a damped
    symplectic-Euler step of the full nonlinear equation; a position whose Hamiltonian would
    rise keeps its previous state with zero velocity, so the energy never increases there.
    """
    b_tilde = op.drive(s, target)
    sqrt_mass = 1.0 / op.inv_sqrt_mass
    psi, velocity = linear_settle(op, b_tilde, s * sqrt_mass)

    energies: list[torch.Tensor] = []
    rejected = 0
    need_energy = track_energy or op.n_corrections > 0
    energy = op.energy(psi, velocity, b_tilde) if need_energy else None
    if track_energy:
        energies.append(energy.detach())

    decay = float(torch.exp(torch.tensor(-op.damping * op.correction_dt)))
    dt = op.correction_dt
    for _ in range(op.n_corrections):
        phi = psi * op.inv_sqrt_mass
        force = -op.apply(psi) + b_tilde - op.inv_sqrt_mass * (torch.tanh(phi) - phi)
        if noise_std > 0.0:
            force = force + noise_std * torch.randn_like(force)
        new_velocity = decay * velocity + dt * force
        new_psi = psi + dt * new_velocity
        new_energy = op.energy(new_psi, new_velocity, b_tilde)
        accept = (new_energy <= energy + 1e-6 * energy.abs().clamp_min(1.0)).unsqueeze(-1)
        rejected += int((~accept).sum())
        psi = torch.where(accept, new_psi, psi)
        velocity = torch.where(accept, new_velocity, torch.zeros_like(velocity))
        energy = torch.where(accept.squeeze(-1), new_energy, op.energy(psi, velocity, b_tilde))
        if track_energy:
            energies.append(energy.detach())

    return SettleResult(phi=psi * op.inv_sqrt_mass, energies=energies, rejected=rejected)


def response_matrix(op: SettleOperator) -> torch.Tensor:
    """Compute the settled linear response d phi / d s at the settling time, as an (H, H) matrix.

    Used for Wilson loops; the tanh corrections are left out, so this is the Part's
    linearisation around phi = 0.
    """
    H = op.modes.shape[0]
    eye = torch.eye(H, dtype=op.modes.dtype)
    b_tilde = op.drive(eye, torch.zeros_like(eye) if op.nudge > 0 else None)
    psi, _ = linear_settle(op, b_tilde, eye / op.inv_sqrt_mass)
    return (psi * op.inv_sqrt_mass).T  # rows of psi are responses to unit drives
