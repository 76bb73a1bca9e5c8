"""SOMI's configuration: the architecture and the parameter cascade that derives its physics.

Every physics constant is a function of the hidden size H and the Part count P
(`SomiConfig.auto`). The reason for each formula sits next to it. `recalibrate` re-derives
all of them after a structural change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SomiConfig:
    """Architecture of one SOMI model plus the constants the cascade derives from it."""

    # Architecture.
    vocab_size: int = 256  # V, tokens of SOMI's tokenizer
    hidden_size: int = 16  # H, features per Part
    n_parts: int = 1  # P, Parts; Part 0 is shared by every System
    routes: list[list[int]] = field(default_factory=lambda: [[0]])  # one route of Parts per System
    norm_width: float = 16.0  # reference width of every norm; fixed at creation so growth keeps logits

    # Settling physics (dimensionless; time is measured in settling time units).
    alpha1: float = 1.0  # strength of graph diffusion alpha1 * L
    lambda_e: float = 0.5  # coupling of the field to the drive through the graph, lambda_E * L (phi - s)
    alpha0: float = 0.1  # leak towards zero, alpha0 * phi
    kappa0: float = 1.0  # pull towards the drive, kappa0 * precision * (phi - s)
    damping: float = 2.0  # beta; the damping force is beta * M * phi' (Rayleigh damping, one rate for all modes)
    settle_time: float = 3.0  # time the linear part is integrated in closed form
    correction_dt: float = 0.2  # step of the symplectic corrections for tanh, below the CFL limit
    n_corrections: int = 2  # symplectic correction steps that apply the tanh nonlinearity
    noise_std: float = 0.0  # noise added to the force during training corrections (0 turns it off)
    n_modes: int = 4  # K, lowest eigenmodes settled exactly; the rest follow one shared oscillator
    degree_floor: float = 0.05  # minimum degree used in D^-1/2 W D^-1/2 (isolated features stay finite)
    degree_ceiling: float = 4.0  # maximum row sum of W after every local step
    sparsity: int = 8  # edges kept per row of W
    mass_min: float = 0.1  # mass bounds; mass is inertia in settling and memory in time
    mass_max: float = 10.0
    precision_min: float = 0.05  # precision bounds
    precision_max: float = 4.0
    field_tau: float = 4.0  # memory of the temporal field, in positions per unit of mass

    # Local (micro) learning.
    nudge: float = 0.1  # kappa_n, strength of the equilibrium-propagation nudge
    local_lr: float = 0.05  # eta for W
    local_decay: float = 1e-4  # weight decay of W per local step
    mass_lr: float = 0.0  # rate of the mass consolidation rule per local step (0 turns it off)
    precision_lr: float = 0.05  # eta for the precision vector
    coupling_lr: float = 0.5  # share of a batch's error along its step that the coupling's rule removes
    coupling_decay: float = 5e-4  # weight decay of U per local step
    local_gate: float = 0.5  # a Part takes a local step when its stress >= gate * its stress EMA

    # Macro (backprop) learning.
    tract_rank: int = 2  # rank of white-matter tracts between consecutive Parts
    lr: float = 3e-3  # AdamW learning rate for embedding, decoder, tracts, gains, System weights
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    jepa_weight: float = 0.1  # weight of the JEPA prediction error next to cross-entropy
    target_ema: float = 0.99  # EMA decay of the target encoder
    stress_ema: float = 0.95  # EMA decay of stress statistics

    # Intervals, in learning steps.
    eigen_refresh_interval: int = 1  # local steps between eigen-cache refreshes
    structure_interval: int = 50  # steps between growth / compression checks
    tokens_per_step: int = 2048  # data rate the intervals were derived for

    @classmethod
    def auto(
        cls,
        hidden_size: int,
        n_parts: int,
        *,
        vocab_size: int = 256,
        routes: list[list[int]] | None = None,
        norm_width: float | None = None,
        tokens_per_step: int = 2048,
    ) -> "SomiConfig":
        """Derive every constant from the hidden size H and the Part count P."""
        if hidden_size < 2:
            raise ValueError(f"hidden_size must be at least 2, got {hidden_size}")
        if n_parts < 1:
            raise ValueError(f"n_parts must be at least 1, got {n_parts}")
        if routes is None:
            routes = default_routes(n_parts)
        config = cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            n_parts=n_parts,
            routes=[list(route) for route in routes],
            norm_width=float(norm_width if norm_width is not None else hidden_size),
            tokens_per_step=tokens_per_step,
        )
        config.recalibrate()
        return config

    @classmethod
    def from_scratch(cls, vocab_size: int = 256) -> "SomiConfig":
        """Return the smallest SOMI (H=16, one Part), from which growth starts."""
        return cls.auto(16, 1, vocab_size=vocab_size)

    def recalibrate(self) -> None:
        """Re-derive every cascade constant from the current H, P and data rate."""
        H, P = self.hidden_size, self.n_parts

        # Weyl's law on a graph of effective dimension d = 2: the number of modes below a
        # given frequency grows like H^(d/(d+2)) = sqrt(H). K stays below H so the shared
        # oscillator always has modes to represent.
        self.n_modes = int(min(max(math.ceil(H ** 0.5), 4), 64, H - 1))

        # The symmetric normalised Laplacian has its spectrum in [0, 2] at every H, so the
        # couplings need no H scaling; the values set the relative stiffness of graph,
        # drive and leak. Precision pulls towards the drive harder than the graph smooths.
        self.alpha1, self.lambda_e, self.alpha0, self.kappa0 = 1.0, 0.5, 0.1, 1.0

        # The stiffest mode has eigenvalue <= ((alpha1 + lambda_E) * 2 + alpha0
        # + kappa0 * precision_max + 1) / mass_min (the +1 is the linearised tanh). Symplectic
        # Euler is stable for dt * omega < 2; half of that limit leaves margin.
        stiffest = ((self.alpha1 + self.lambda_e) * 2.0 + self.alpha0 + self.kappa0 * self.precision_max + 1.0)
        stiffest /= self.mass_min
        self.correction_dt = 0.5 * 2.0 / math.sqrt(stiffest)

        # The softest mode has eigenvalue >= (alpha0 + kappa0 * precision_min + 1) / mass_max.
        # Damping at twice its natural frequency damps that mode critically; stiffer modes
        # ring inside the envelope exp(-beta t / 2). Any beta > 0 keeps every mode stable
        # because all eigenvalues are positive.
        softest = (self.alpha0 + self.kappa0 * self.precision_min + 1.0) / self.mass_max
        self.damping = 2.0 * math.sqrt(softest)

        # Long enough for the envelope of every mode to fall to e^-4 (under 2 %), so the
        # settled field is close to its equilibrium, which equilibrium propagation assumes.
        # The closed form costs the same for any settling time.
        self.settle_time = 8.0 / self.damping

        # Edges per row: about 2 sqrt(H), enough for a connected graph with local structure,
        # and never more than H - 1 neighbours.
        self.sparsity = int(min(max(2 * math.ceil(H ** 0.5), 4), H - 1))

        # Memory of the temporal field grows slowly with width: wider models can keep more
        # slow features. With mass in [0.1, 10] the memory spans 0.1 * tau to 10 * tau positions.
        self.field_tau = max(2.0, math.log2(H))

        # Local steps are normalised (each moves W by local_lr of its mean edge weight, in
        # root-mean-square terms), so the rate needs no H scaling; 5 % per step lets a
        # repeated batch reshape the graph within tens of steps without oscillating.
        self.local_lr = 0.05
        self.local_decay = 1e-3 * self.local_lr

        # The input coupling's step is a share of the exact line minimum on the batch, so
        # the rate is dimensionless and stable below 2. Half keeps most of what earlier
        # batches taught while a repeated batch converges within tens of steps. Its
        # decay matches W's.
        self.coupling_lr = 0.5
        self.coupling_decay = 1e-3 * self.coupling_lr

        # Mass sets the memory of the temporal field, which both the drive and the JEPA
        # target read, and equilibrium propagation gives it no gradient. The per-step mass
        # rule raised the JEPA error at every rate tried (0.01 and 0.001), so it is off.
        self.mass_lr = 0.0

        # Tract rank grows with width, H / 8, between 2 and 64.
        self.tract_rank = int(min(max(math.ceil(H / 8), 2), 64))

        # AdamW step shrinks with the square root of width (wider layers sum more terms).
        self.lr = float(min(max(3e-3 * math.sqrt(256.0 / H), 1e-3), 1e-2))

        # The target encoder averages over about 100 steps, more when there are many Parts
        # to keep consistent.
        self.target_ema = 1.0 - 1.0 / (100.0 * math.sqrt(P))

        # Structure checks happen after about 100k tokens, so the interval scales with the
        # data rate; growth needs evidence from many batches.
        self.structure_interval = int(max(10, math.ceil(100_000 / max(self.tokens_per_step, 1))))

        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a derived constant is outside its safe range."""
        H = self.hidden_size
        if not 1 <= self.n_modes < H:
            raise ValueError(f"n_modes={self.n_modes} must be in [1, H-1] with H={H}")
        if not 1 <= self.sparsity < H:
            raise ValueError(f"sparsity={self.sparsity} must be in [1, H-1] with H={H}")
        if self.damping <= 0:
            raise ValueError(f"damping={self.damping} must be positive for stable modes")
        stiffest = ((self.alpha1 + self.lambda_e) * 2.0 + self.alpha0 + self.kappa0 * self.precision_max + 1.0)
        cfl = 2.0 / math.sqrt(stiffest / self.mass_min)
        if self.correction_dt >= cfl:
            raise ValueError(f"correction_dt={self.correction_dt:.4g} is above the CFL limit {cfl:.4g}")
        if len(self.routes) < 1:
            raise ValueError("a SOMI model needs at least one System route")
        for route in self.routes:
            if not route or route[0] != 0:
                raise ValueError(f"route {route} must start at the shared Part 0")
            if any(not 0 <= p < self.n_parts for p in route):
                raise ValueError(f"route {route} names a Part outside [0, {self.n_parts})")
            if len(set(route)) != len(route):
                raise ValueError(f"route {route} visits a Part twice")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SomiConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; this somi-ray version knows {sorted(known)}")
        config = cls(**data)
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SomiConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def default_routes(n_parts: int) -> list[list[int]]:
    """Return one route per specialised Part, each entering through the shared Part 0."""
    if n_parts == 1:
        return [[0]]
    return [[0, p] for p in range(1, n_parts)]
