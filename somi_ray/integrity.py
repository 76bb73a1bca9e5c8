"""Integrity checks, Wilson loops and fingerprints of a SOMI model.

A Wilson loop of a System is the ordered product of the linear maps along its route: each
Part's settled linear response J_p = I + diag(g_p) (R_p - I), where R_p = d phi / d s is the
closed-form response of the Part's settle, and the tract between consecutive Parts. A
one-Part route is closed by the identity. The normalised trace tr(W) / H and the largest
|eigenvalues| of the loop summarise what the route does to a signal. Absorption and compression
compare loops before and after and roll back when the relative change exceeds a tolerance
derived from the loop's own drift under ordinary learning (`WilsonDrift`).

Everything here is plain PyTorch; nothing imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from somi_ray.physics.laplacian import normalized_laplacian
from somi_ray.physics.settle import linear_settle, response_matrix, settle

logger = logging.getLogger(__name__)

TOP_EIGENVALUES = 4  # |eigenvalues| of each Wilson loop kept in reports
LOWEST_EIGENVALUES = 8  # Laplacian eigenvalues kept in each spectrum summary


# ---------------------------------------------------------------------------------------------
# Wilson loops


def part_response(part) -> torch.Tensor:
    """Linear response dy/dx (H, H) of a Part around zero: I + diag(g) (R (I + U) - I), column convention.

    The drive's normalisation and the temporal field are left out, so this is the map a
    perturbation of the settled drive goes through, not the full Jacobian of the Part.
    """
    free, _ = part.operators()
    R = response_matrix(free)  # (H, H), R[i, j] = d phi_i / d u_j for the coupled drive u
    H = R.shape[0]
    eye = torch.eye(H, dtype=R.dtype, device=R.device)
    R = R @ (eye + part.coupling.to(R.dtype))
    gain = part.output_gain.detach().to(R.dtype)
    return eye + gain[:, None] * (R - eye)


@dataclass
class WilsonLoop:
    """Summary of one System's Wilson loop."""

    system: int
    route: list[int]
    trace: float  # tr(W) / H
    top_eigenvalues: list[float]  # largest |eigenvalues|, descending
    finite: bool


@torch.no_grad()
def wilson_loops(model) -> list[WilsonLoop]:
    """Compute the Wilson loop of every System's route."""
    from somi_ray.model import tract_key

    responses = {index: part_response(part).double() for index, part in enumerate(model.parts)}
    loops = []
    for system, route in enumerate(model.config.routes):
        loop = responses[route[0]]
        for position in range(1, len(route)):
            # Tract.matrix() acts on row vectors, so its transpose acts on columns.
            tract = model.tracts[tract_key(system, position)].matrix().detach().double().T
            loop = responses[route[position]] @ tract @ loop  # (H, H)
        H = loop.shape[0]
        finite = bool(torch.isfinite(loop).all())
        if finite:
            magnitudes = torch.linalg.eigvals(loop).abs().sort(descending=True).values[:TOP_EIGENVALUES]
            top = [float(v) for v in magnitudes]
            trace = float(torch.trace(loop) / H)
        else:
            top, trace = [], float("nan")
        loops.append(WilsonLoop(system=system, route=list(route), trace=trace, top_eigenvalues=top, finite=finite))
    return loops


class WilsonDrift:
    """Recent step-to-step relative changes of each System's Wilson trace under learning.

    The caller records loops after ordinary learning steps. `tolerance(system)` is then
    mean + n_sigma * std of the recent relative changes, at least `floor`. A check with it
    passes normal learning and fails on a jump well outside it.
    """

    def __init__(self, window: int = 32, n_sigma: float = 4.0, floor: float = 1e-3):
        self.window = window
        self.n_sigma = n_sigma
        self.floor = floor
        self.last: dict[int, float] = {}
        self.changes: dict[int, deque] = {}

    def record(self, loops: list[WilsonLoop]) -> None:
        for loop in loops:
            if not loop.finite:
                continue
            previous = self.last.get(loop.system)
            if previous is not None:
                change = abs(loop.trace - previous) / max(abs(previous), 1e-12)
                self.changes.setdefault(loop.system, deque(maxlen=self.window)).append(change)
            self.last[loop.system] = loop.trace

    def tolerance(self, system: int) -> float:
        changes = list(self.changes.get(system, ()))
        if len(changes) < 2:
            return self.floor
        mean = sum(changes) / len(changes)
        std = math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1))
        return max(self.floor, mean + self.n_sigma * std)

    def tolerances(self) -> dict[int, float]:
        return {system: self.tolerance(system) for system in self.last}

    def to_dict(self) -> dict:
        return {"window": self.window, "n_sigma": self.n_sigma, "floor": self.floor, "last": self.last,
                "changes": {s: list(c) for s, c in self.changes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "WilsonDrift":
        drift = cls(data["window"], data["n_sigma"], data["floor"])
        drift.last = {int(s): float(v) for s, v in data["last"].items()}
        drift.changes = {int(s): deque(c, maxlen=drift.window) for s, c in data["changes"].items()}
        return drift


# ---------------------------------------------------------------------------------------------
# Spectra and fingerprints


@torch.no_grad()
def spectrum_summary(part, degree_floor: float) -> dict:
    """Lowest Laplacian eigenvalues, spectral gap and entropy effective rank of one Part."""
    L = normalized_laplacian(part.W.double(), degree_floor)
    eigenvalues = torch.linalg.eigvalsh(0.5 * (L + L.T))  # ascending
    share = eigenvalues.clamp_min(0.0)
    share = share / share.sum().clamp_min(1e-12)
    entropy = -(share * torch.log(share.clamp_min(1e-30))).sum()
    return {
        "lowest": [float(v) for v in eigenvalues[:LOWEST_EIGENVALUES]],
        "min": float(eigenvalues[0]),
        "max": float(eigenvalues[-1]),
        "spectral_gap": float(eigenvalues[1] - eigenvalues[0]) if len(eigenvalues) > 1 else 0.0,
        "effective_rank": float(torch.exp(entropy)),
    }


@torch.no_grad()
def stress_profiles(model, ids: torch.Tensor) -> dict[int, dict]:
    """Per-Part stress on a probe batch (B, T+1): the mean relative JEPA error and its per-feature share."""
    if ids.shape[0] < 2:
        raise ValueError(f"stress needs a probe batch of at least 2 sequences, got {ids.shape[0]}")
    was_training = model.training
    model.eval()
    out = model.run(ids[:, :-1])
    targets = model.jepa_targets(ids)
    profiles: dict[int, list[torch.Tensor]] = {}
    for visit in out.visits:
        z = targets[(visit.system, visit.position)]
        squared = ((visit.phi - z) ** 2).flatten(0, 1)  # (N, H)
        energy = (z * z).sum(-1).flatten().clamp_min(1e-8)  # (N,)
        profiles.setdefault(visit.part, []).append((squared / energy[:, None]).mean(0))  # (H,)
    if was_training:
        model.train()
    result = {}
    for part, rows in profiles.items():
        per_feature = torch.stack(rows).mean(0)  # (H,)
        result[part] = {"stress": float(per_feature.sum()), "per_feature": [float(v) for v in per_feature]}
    return result


def fingerprint(model, probe_batches: dict[str, torch.Tensor], probe_bpb: dict[str, float] | None = None) -> dict:
    """Fingerprint a model: per-Part stress profile per probe domain, spectra, Wilson traces, probe bpb."""
    c = model.config
    return {
        "hidden_size": c.hidden_size,
        "n_parts": c.n_parts,
        "routes": [list(r) for r in c.routes],
        "stress": {domain: stress_profiles(model, ids) for domain, ids in probe_batches.items()},
        "spectra": {index: spectrum_summary(part, c.degree_floor) for index, part in enumerate(model.parts)},
        "wilson": [asdict(loop) for loop in wilson_loops(model)],
        "probe_bpb": dict(probe_bpb or {}),
    }


# ---------------------------------------------------------------------------------------------
# Integrity check


@dataclass
class IntegrityReport:
    """Result of `check_model`; `healthy` is true when no check failed."""

    finite: bool  # every parameter and buffer is finite
    w_constraints: dict[int, list[str]]  # per Part, the constraints of W that fail (empty when all hold)
    spectrum: dict[int, tuple[float, float]]  # per Part, (min, max) eigenvalue of the Laplacian
    spectrum_ok: bool  # every Laplacian spectrum lies in [0, 2]
    energy_ok: bool  # the Hamiltonian never rose on the probe settle of any Part
    energy_max_rise: float  # largest relative rise seen (0 when none)
    wilson: list[WilsonLoop]
    wilson_ok: bool  # every Wilson loop is finite
    causal: bool  # early logits did not move when a late probe token changed
    causal_max_change: float
    issues: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        data = asdict(self)
        data["healthy"] = self.healthy
        data["w_constraints"] = {str(k): v for k, v in self.w_constraints.items()}
        data["spectrum"] = {str(k): list(v) for k, v in self.spectrum.items()}
        return data

    def summary(self) -> str:
        lines = [f"healthy: {self.healthy}"]
        lines.append(f"tensors finite: {self.finite}")
        for part, failures in self.w_constraints.items():
            low, high = self.spectrum.get(part, (float("nan"), float("nan")))
            state = "ok" if not failures else ", ".join(failures)
            lines.append(f"Part {part}: W constraints {state}; Laplacian spectrum [{low:.4f}, {high:.4f}]")
        lines.append(f"energy non-increasing on probe settle: {self.energy_ok} (max relative rise {self.energy_max_rise:.2e})")
        for loop in self.wilson:
            top = ", ".join(f"{v:.4f}" for v in loop.top_eigenvalues)
            lines.append(f"System {loop.system} route {loop.route}: Wilson trace {loop.trace:.6f}, top |eig| [{top}]")
        lines.append(f"causal: {self.causal} (max early-logit change {self.causal_max_change:.2e})")
        for issue in self.issues:
            lines.append(f"ISSUE: {issue}")
        return "\n".join(lines)


def w_constraint_failures(part, degree_floor: float, degree_ceiling: float, atol: float = 1e-5) -> list[str]:
    """Name each constraint of W that fails.

    A row that is exactly zero is an isolated feature, which growth adds. The degree floor in
    the Laplacian keeps it finite and the next local step lifts it. So only rows strictly
    between 0 and the floor fail the floor check.
    """
    W = part.W.detach().double()
    scale = max(float(W.abs().max()), 1.0)
    failures = []
    if bool((W < -atol * scale).any()):
        failures.append(f"negative entries (min {float(W.min()):.3g})")
    if float((W - W.T).abs().max()) > atol * scale:
        failures.append(f"not symmetric (max |W - W^T| {float((W - W.T).abs().max()):.3g})")
    if float(torch.diagonal(W).abs().max()) > atol * scale:
        failures.append("non-zero diagonal")
    off_mask = W * (~part.mask.bool())
    if float(off_mask.abs().max()) > atol * scale:
        failures.append("edges outside the mask")
    degree = W.sum(1)
    connected = degree > 0
    if bool((degree[connected] < degree_floor * (1 - 1e-4) - atol).any()):
        failures.append(f"degree below floor {degree_floor} (min {float(degree[connected].min()):.3g})")
    if bool((degree > degree_ceiling * (1 + 1e-4) + atol).any()):
        failures.append(f"degree above ceiling {degree_ceiling} (max {float(degree.max()):.3g})")
    return failures


def non_finite_tensors(model) -> list[str]:
    """Names of floating-point parameters and buffers with NaN or infinite entries.

    A Part's stress EMA is NaN until its first local step (it marks "no history yet"),
    so it is left out.
    """
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not name.endswith("stress_ema") and not bool(torch.isfinite(tensor).all())]


def default_probe(model, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length + 1), generator=generator)


@torch.no_grad()
def probe_energy(model, probe_ids: torch.Tensor) -> float:
    """Largest relative rise of the Hamiltonian over the correction steps of every Part's probe settle,
    and over the closed-form linear phase sampled at 16 times; 0 when the energy never rose."""
    out = model.run(probe_ids[:, :-1].to(model.device))
    worst = 0.0
    for visit in out.visits:
        free, _ = model.parts[visit.part].operators()
        s = visit.drive.reshape(-1, visit.drive.shape[-1]).double()
        op = free.to(torch.float64)
        result = settle(op, s, track_energy=True)
        energies = torch.stack(result.energies)  # (steps, N)
        worst = max(worst, _max_relative_rise(energies))

        b_tilde = op.drive(s)
        psi0 = s / op.inv_sqrt_mass
        linear = []
        for t in torch.linspace(0.0, op.settle_time, 16).tolist():
            psi, velocity = linear_settle(op, b_tilde, psi0, t)
            linear.append(op.linear_energy(psi, velocity, b_tilde))
        worst = max(worst, _max_relative_rise(torch.stack(linear)))
    return worst


def _max_relative_rise(energies: torch.Tensor) -> float:
    rise = energies[1:] - energies[:-1]  # (steps - 1, N)
    scale = energies.abs().amax(0).clamp_min(1.0)
    return float((rise / scale).max().clamp_min(0.0)) if rise.numel() else 0.0


@torch.no_grad()
def causality_change(model, probe_ids: torch.Tensor) -> float:
    """Max |change| of the logits before the last position when the last token changes (eval mode)."""
    was_training = model.training
    model.eval()
    ids = probe_ids[:, :-1].to(model.device)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    before = model(ids)[:, :-1]
    after = model(changed)[:, :-1]
    if was_training:
        model.train()
    return float((before - after).abs().max())


def check_model(model, probe_ids: torch.Tensor | None = None, *, energy_tolerance: float = 1e-6,
                causal_tolerance: float = 1e-5) -> IntegrityReport:
    """Run every integrity check on a model; probe_ids (B, T+1) defaults to random tokens."""
    c = model.config
    if probe_ids is None:
        probe_ids = default_probe(model)
    issues: list[str] = []

    bad = non_finite_tensors(model)
    finite = not bad
    if not finite:
        issues.append(f"non-finite tensors: {bad}")

    w_failures, spectrum = {}, {}
    for index, part in enumerate(model.parts):
        w_failures[index] = w_constraint_failures(part, c.degree_floor, c.degree_ceiling)
        for failure in w_failures[index]:
            issues.append(f"Part {index}: W has {failure}")
        summary = spectrum_summary(part, c.degree_floor) if finite else {"min": float("nan"), "max": float("nan")}
        spectrum[index] = (summary["min"], summary["max"])
    spectrum_ok = all(low >= -1e-6 and high <= 2.0 + 1e-6 for low, high in spectrum.values())
    if not spectrum_ok:
        issues.append(f"Laplacian spectrum outside [0, 2]: {spectrum}")

    energy_rise = probe_energy(model, probe_ids) if finite else float("inf")
    energy_ok = energy_rise <= energy_tolerance
    if not energy_ok:
        issues.append(f"Hamiltonian rose by {energy_rise:.3g} (relative) on the probe settle")

    loops = wilson_loops(model) if finite else []
    wilson_ok = finite and all(loop.finite for loop in loops)
    if not wilson_ok:
        issues.append("a Wilson loop is not finite")

    change = causality_change(model, probe_ids) if finite else float("inf")
    causal = change <= causal_tolerance
    if not causal:
        issues.append(f"early logits changed by {change:.3g} when a later token changed")

    report = IntegrityReport(
        finite=finite, w_constraints=w_failures, spectrum=spectrum, spectrum_ok=spectrum_ok, energy_ok=energy_ok,
        energy_max_rise=energy_rise, wilson=loops, wilson_ok=wilson_ok, causal=causal, causal_max_change=change,
        issues=issues,
    )
    if issues:
        logger.warning("integrity check failed: %s", "; ".join(issues))
    return report


@dataclass
class Comparison:
    """Wilson-loop relative changes between two reports and the Systems that exceeded tolerance."""

    changes: dict[int, float]
    tolerances: dict[int, float]
    exceeded: list[int]

    @property
    def ok(self) -> bool:
        return not self.exceeded


def compare(before: IntegrityReport, after: IntegrityReport, tolerances: dict[int, float] | float) -> Comparison:
    """Compare the Wilson traces of two reports System by System (see `compare_loops`)."""
    return compare_loops(before.wilson, after.wilson, tolerances)


def compare_loops(before: list[WilsonLoop], after: list[WilsonLoop],
                  tolerances: dict[int, float] | float) -> Comparison:
    """Compare two lists of Wilson loops System by System.

    tolerances is one relative change for every System, or one per System (for example
    `WilsonDrift.tolerances()`). A System present before but missing or non-finite after
    counts as exceeded; Systems added after the first list are not compared.
    """
    after_by_system = {loop.system: loop for loop in after}
    changes, limits, exceeded = {}, {}, []
    for loop in before:
        limit = tolerances if isinstance(tolerances, (int, float)) else tolerances.get(loop.system, 0.0)
        limits[loop.system] = float(limit)
        new = after_by_system.get(loop.system)
        if new is None or not new.finite or not loop.finite:
            changes[loop.system] = float("inf")
            exceeded.append(loop.system)
            continue
        change = abs(new.trace - loop.trace) / max(abs(loop.trace), 1e-12)
        changes[loop.system] = change
        if change > limit:
            exceeded.append(loop.system)
    return Comparison(changes=changes, tolerances=limits, exceeded=exceeded)


# ---------------------------------------------------------------------------------------------
# Command line


def register_cli(subparsers) -> None:
    """Add `check DIR [--json FILE]` to an argparse subparsers object."""
    parser = subparsers.add_parser("check", help="run the integrity checks on a checkpoint")
    parser.add_argument("checkpoint", help="checkpoint folder")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report to this JSON file")
    parser.set_defaults(func=run_check)


def run_check(args) -> int:
    """Load the checkpoint, print the report, and return exit code 0 when healthy, 1 otherwise."""
    from somi_ray.lineage import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    report = check_model(checkpoint.model)
    print(f"checkpoint {checkpoint.path} (version {checkpoint.version})")
    print(report.summary())
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    return 0 if report.healthy else 1
