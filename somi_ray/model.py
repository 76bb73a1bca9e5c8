"""SomiModel: boundaries, Parts, Systems and tracts, with dual learning on every batch.

Data flow: tokens -> embedding E -> Systems (routes of Parts joined by low-rank tracts; Part 0
is shared) -> softmax mix of Systems -> norm -> decoder D -> logits. Backprop trains E, D, the
tracts, the System weights and the per-feature gains; W, mass and precision are buffers that
only the local rules change, after the batch's outputs exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from somi_ray.config import SomiConfig
from somi_ray.physics.field import field_decay, previous_field, temporal_field
from somi_ray.physics.laplacian import project_constraints, random_graph, snap_to_int8_grid
from somi_ray.physics.settle import SettleOperator, response_matrix, settle
from somi_ray.physics.stress import (
    connectivity_gradient,
    connectivity_step,
    coupling_step,
    mass_step,
    precision_step,
    relative_error,
)


def fixed_width_norm(x: torch.Tensor, width: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale each vector to squared norm `width`.

    The width is fixed when the model is created, so features added later with value zero
    change neither the norm nor any other feature: growth keeps the logits.
    """
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) / width + eps)


class Part(nn.Module):
    """One Part: a feature graph W whose field settles under the drive of its input."""

    def __init__(self, config: SomiConfig, generator: torch.Generator | None = None):
        super().__init__()
        H = config.hidden_size
        W, mask = random_graph(H, config.sparsity, generator)
        self.register_buffer("W", W)  # (H, H) non-negative, symmetric, zero diagonal
        self.register_buffer("mask", mask)  # (H, H) bool, edges local learning may use
        # Log-uniform masses give the temporal field memories from 0.25 to 4 times tau.
        log_mass = (torch.rand(H, generator=generator) * 2.0 - 1.0) * math.log(4.0)
        self.register_buffer("mass", torch.exp(log_mass))  # (H,)
        self.register_buffer("precision", torch.ones(H))  # (H,)
        # Input coupling U: the settle is driven by s + U s, so each feature's drive may read
        # the others'. It starts at zero and only the local rule changes it.
        self.register_buffer("coupling", torch.zeros(H, H))  # (H, H)
        # Running second moment of the uncoupled drive, sum_t w s s^T, which preconditions
        # the coupling's rule. It is all zero until the first local step.
        self.register_buffer("drive_moments", torch.zeros(H, H))  # (H, H)
        self.register_buffer("n_modes", torch.tensor(config.n_modes))  # K of this Part's eigen cache
        # Step of W's int8 grid, or 0 while W is kept in float. A Part on the grid stays on it
        # after every local step, and checkpoints store its W as int8.
        self.register_buffer("w_scale", torch.tensor(0.0))
        self.register_buffer("stress_ema", torch.tensor(float("nan")))  # running JEPA error
        self.register_buffer("local_steps", torch.tensor(0))

        self.output_gain = nn.Parameter(torch.full((H,), 0.5))  # g in y = x + g (phi - x)
        self.drive_gain = nn.Parameter(torch.ones(H))  # gain after the drive's norm
        self.context_gain = nn.Parameter(torch.ones(H))  # weight of the field r_{t-1} in the drive
        self.config = config
        self._operators: tuple[SettleOperator, SettleOperator] | None = None

    @property
    def hidden_size(self) -> int:
        return self.W.shape[0]

    def invalidate(self) -> None:
        """Drop the eigen caches; they are rebuilt on next use."""
        self._operators = None

    def operators(self) -> tuple[SettleOperator, SettleOperator]:
        """Free and nudged settling operators, built from W, mass and precision on demand."""
        if self._operators is None:
            c = self.config
            common = dict(
                alpha1=c.alpha1, lambda_e=c.lambda_e, alpha0=c.alpha0, kappa0=c.kappa0,
                degree_floor=c.degree_floor, n_modes=int(self.n_modes), damping=c.damping,
                settle_time=c.settle_time, correction_dt=c.correction_dt, n_corrections=c.n_corrections,
            )
            free = SettleOperator.build(self.W, self.mass, self.precision, **common)
            nudged = SettleOperator.build(self.W, self.mass, self.precision, nudge=c.nudge, **common)
            self._operators = (free, nudged)
        return self._operators

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """s_t from x_t and the field r_{t-1} of earlier positions; (B, T, H) -> (B, T, H)."""
        decay = field_decay(self.mass, self.config.field_tau)
        r = temporal_field(x, decay)  # (B, T, H)
        mixed = x + self.context_gain * previous_field(r)
        return fixed_width_norm(mixed, self.config.norm_width) * self.drive_gain

    def couple(self, s: torch.Tensor) -> torch.Tensor:
        """Return the settle's drive s + U s for drives s (..., H)."""
        return s + s @ self.coupling.T

    def forward(
        self, x: torch.Tensor, noise_std: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (y, phi, coupled drive, drive), each (B, T, H)."""
        s = self.drive(x)
        u = self.couple(s)
        free, _ = self.operators()
        phi = settle(free, u, noise_std=noise_std).phi
        y = x + self.output_gain * (phi - x)
        return y, phi, u, s


class Tract(nn.Module):
    """White-matter tract between consecutive Parts: y + (y V) U^T, trained by backprop."""

    def __init__(self, hidden_size: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.randn(hidden_size, rank, generator=generator) / math.sqrt(hidden_size))
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))  # zero: a new tract changes nothing

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + (y @ self.down) @ self.up.T

    def matrix(self) -> torch.Tensor:
        """Return the tract as an (H, H) map acting on row vectors."""
        H = self.down.shape[0]
        return torch.eye(H, dtype=self.down.dtype, device=self.down.device) + self.down @ self.up.T


@dataclass
class PartVisit:
    """One application of a Part inside a System's route, kept for local learning."""

    part: int
    system: int
    position: int  # index in the route
    drive: torch.Tensor  # (B, T, H) drive the settle saw, after the input coupling
    phi: torch.Tensor  # (B, T, H) free settled field
    source: torch.Tensor  # (B, T, H) drive before the input coupling


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (B, T, V)
    visits: list[PartVisit] = field(default_factory=list)


@dataclass
class LearnStats:
    """Measurements of one learning step; its logits are those computed before any update."""

    loss: float  # mean next-token cross-entropy, nats per token
    jepa_error: float  # mean relative JEPA prediction error over Parts
    stress_per_sequence: torch.Tensor  # (B,) relative JEPA error per sequence
    stress_per_part: dict[int, float]
    local_parts: list[int]  # Parts that took a local step
    logits: torch.Tensor | None = None  # (B, T, V), detached


class SomiModel(nn.Module):
    """The SOMI language model."""

    def __init__(self, config: SomiConfig, seed: int = 0):
        super().__init__()
        config.validate()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        V, H = config.vocab_size, config.hidden_size

        self.embedding = nn.Embedding(V, H)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(V, H, generator=generator))
        self.register_buffer("target_embedding", self.embedding.weight.detach().clone())  # JEPA target encoder
        self.parts = nn.ModuleList([Part(config, generator) for _ in range(config.n_parts)])
        self.tracts = nn.ModuleDict()
        for system, route in enumerate(config.routes):
            for position in range(1, len(route)):
                self.tracts[tract_key(system, position)] = Tract(H, config.tract_rank, generator)
        self.system_logits = nn.Parameter(torch.zeros(len(config.routes)))
        self.final_gain = nn.Parameter(torch.ones(H))
        self.decoder = nn.Linear(H, V)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(V, H, generator=generator) * 0.02)
            self.decoder.bias.zero_()

        # Running sums for the correlation between per-sequence stress and loss.
        self.register_buffer("stress_loss_moments", torch.zeros(6, dtype=torch.float64))
        self.register_buffer("learn_steps", torch.tensor(0))

    # ----------------------------------------------------------------- forward pass

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        return self.run(ids).logits

    def run(self, ids: torch.Tensor, noise_std: float = 0.0) -> ForwardOutput:
        """Forward pass that also returns every Part visit's drive and settled field."""
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, positions), got {tuple(ids.shape)}")
        V = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must be in [0, {V}), got range [{int(ids.min())}, {int(ids.max())}]")
        x = self.embedding(ids)  # (B, T, H)
        visits: list[PartVisit] = []

        shared_y, shared_phi, shared_u, shared_s = self.parts[0](x, noise_std)
        outputs = []
        for system, route in enumerate(self.config.routes):
            if system == 0:
                visits.append(PartVisit(0, 0, 0, shared_u, shared_phi, shared_s))
            y = shared_y
            for position in range(1, len(route)):
                y = self.tracts[tract_key(system, position)](y)
                y, phi, u, s = self.parts[route[position]](y, noise_std)
                visits.append(PartVisit(route[position], system, position, u, phi, s))
            outputs.append(y)

        weights = torch.softmax(self.system_logits, dim=0)  # (S,)
        mixed = sum(w * y for w, y in zip(weights, outputs))  # (B, T, H)
        hidden = fixed_width_norm(mixed, self.config.norm_width) * self.final_gain
        return ForwardOutput(logits=self.decoder(hidden), visits=visits)

    @torch.no_grad()
    def jepa_targets(self, ids: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """JEPA target of every (system, route position) for windows ids (B, T+1), each (B, T, H).

        The target of position t is the target encoder's drive of position t+1: the EMA
        embedding row of the next token, scaled to a fixed norm, plus the temporal field of
        those rows up to t,
        normalised like Part 0's drive, with gradients stopped. The target encoder is thus the
        input encoder with EMA token rows, so the target lives in the drive's coordinates
        and holds the next token in its context. Later route positions carry it through
        the same tracts as the activations.
        """
        part = self.parts[0]
        width = self.config.norm_width
        # Every token row enters at the same norm, so the error measures how unpredictable
        # the next token is, not how long its embedding row happens to be.
        x_bar = fixed_width_norm(self.target_embedding[ids], width)  # (B, T+1, H)
        r_bar = temporal_field(x_bar, field_decay(part.mass, self.config.field_tau))  # (B, T+1, H)
        mixed = x_bar[:, 1:] + part.context_gain.detach() * r_bar[:, :-1]  # (B, T, H)
        base = fixed_width_norm(mixed, width) * part.drive_gain.detach()
        targets = {(0, 0): base}
        for system, route in enumerate(self.config.routes):
            z = base
            for position in range(1, len(route)):
                z = fixed_width_norm(self.tracts[tract_key(system, position)](z), width)
                targets[(system, position)] = z
        return targets

    # ----------------------------------------------------------------- stress

    @torch.no_grad()
    def measure_stress(self, ids: torch.Tensor) -> dict:
        """Stress of a batch (B, T+1): per token (B, T), per sequence (B,) and per Part."""
        out = self.run(ids[:, :-1])
        return self._stress(out, ids)

    def _stress(self, out: ForwardOutput, ids: torch.Tensor) -> dict:
        targets = self.jepa_targets(ids)
        per_token = []
        per_part: dict[int, list[torch.Tensor]] = {}
        for visit in out.visits:
            err = relative_error(visit.phi.detach(), targets[(visit.system, visit.position)].detach())
            per_token.append(err)
            per_part.setdefault(visit.part, []).append(err.mean())
        token = torch.stack(per_token).mean(0)  # (B, T)
        return {
            "per_token": token,
            "per_sequence": token.mean(1),
            "per_part": {p: float(torch.stack(v).mean()) for p, v in per_part.items()},
            "targets": targets,
        }

    def stress_loss_correlation(self) -> float:
        """Pearson correlation of per-sequence stress and loss over recent learning steps."""
        n, sx, sy, sxx, syy, sxy = self.stress_loss_moments.tolist()
        if n < 3:
            return float("nan")
        cov = sxy / n - (sx / n) * (sy / n)
        vx = sxx / n - (sx / n) ** 2
        vy = syy / n - (sy / n) ** 2
        if vx <= 1e-18 or vy <= 1e-18:
            return float("nan")
        return cov / math.sqrt(vx * vy)

    # ----------------------------------------------------------------- dual learning

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW over the macro parameters; W, mass and precision are buffers and not included."""
        return torch.optim.AdamW(
            self.parameters(), lr=lr or self.config.lr, weight_decay=self.config.weight_decay, betas=(0.9, 0.98)
        )

    def learn_step(
        self,
        batch: torch.Tensor,
        optimizer: torch.optim.Optimizer | None,
        *,
        local: bool = True,
        return_logits: bool = False,
        extra_loss=None,
    ) -> LearnStats:
        """One dual-learning step on token windows (B, T+1).

        Order: forward and loss with the current state; backprop step on the macro
        parameters (skipped when optimizer is None); then local steps on W, mass and
        precision from the stored free fields; then the target encoder's EMA. The logits
        returned are those of the forward pass, before any update, so position t never
        depends on tokens after t. `extra_loss(logits, inputs)` may add a term (distillation).
        """
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"a learning batch must have shape (batch, positions + 1), got {tuple(batch.shape)}")
        inputs, next_ids = batch[:, :-1], batch[:, 1:]
        was_training = self.training
        self.train()

        out = self.run(inputs, noise_std=self.config.noise_std)
        stress = self._stress(out, batch)
        ce = F.cross_entropy(out.logits.flatten(0, 1), next_ids.flatten(), reduction="none").view_as(next_ids)

        # Selective update: tokens that surprise the model weigh more in the macro loss.
        token_stress = stress["per_token"]
        gate = (token_stress / token_stress.mean().clamp_min(1e-8)).clamp(0.5, 2.0)
        loss = (gate * ce).sum() / gate.sum()
        targets = stress["targets"]
        jepa = torch.stack([
            relative_error(v.phi, targets[(v.system, v.position)].detach()).mean() for v in out.visits
        ]).mean()
        total = loss + self.config.jepa_weight * jepa
        if extra_loss is not None:
            total = total + extra_loss(out.logits, inputs)

        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            self._scale_grads_by_mass()
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.config.grad_clip)
            optimizer.step()

        with torch.no_grad():
            local_parts = self._local_step(out, stress, gate) if local else []
            tau = self.config.target_ema
            self.target_embedding.mul_(tau).add_((1.0 - tau) * self.embedding.weight)
            seq_loss = ce.detach().mean(1).double()
            seq_stress = stress["per_sequence"].double()
            decay = self.config.stress_ema
            moments = torch.stack([
                torch.tensor(float(len(seq_loss)), dtype=torch.float64), seq_stress.sum(), seq_loss.sum(),
                (seq_stress ** 2).sum(), (seq_loss ** 2).sum(), (seq_stress * seq_loss).sum(),
            ]).to(self.stress_loss_moments.device)
            self.stress_loss_moments.mul_(decay).add_(moments)
            self.learn_steps += 1

        if not was_training:
            self.eval()
        return LearnStats(
            loss=float(ce.detach().mean()),
            jepa_error=float(jepa.detach()),
            stress_per_sequence=stress["per_sequence"].cpu(),
            stress_per_part=stress["per_part"],
            local_parts=local_parts,
            logits=out.logits.detach() if return_logits else None,
        )

    def _scale_grads_by_mass(self) -> None:
        """Mass-guided rates: each feature's gradient is scaled by mean mass / its mass."""
        for part in self.parts:
            scale = part.mass.mean() / part.mass
            for param in (part.output_gain, part.drive_gain, part.context_gain):
                if param.grad is not None:
                    param.grad.mul_(scale)
        shared_scale = self.parts[0].mass.mean() / self.parts[0].mass
        if self.embedding.weight.grad is not None:
            self.embedding.weight.grad.mul_(shared_scale)

    def _local_step(self, out: ForwardOutput, stress: dict, gate: torch.Tensor) -> list[int]:
        """Equilibrium-propagation steps on W, precision and mass of every stressed Part."""
        c = self.config
        targets = stress["targets"]
        weights = (gate / gate.sum()).flatten()  # (N,)
        visits_by_part: dict[int, list[PartVisit]] = {}
        for visit in out.visits:
            visits_by_part.setdefault(visit.part, []).append(visit)

        stepped = []
        for index, visits in visits_by_part.items():
            part = self.parts[index]
            part_stress = stress["per_part"][index]
            ema = float(part.stress_ema)
            if math.isnan(ema):
                part.stress_ema.fill_(part_stress)
            else:
                part.stress_ema.fill_(c.stress_ema * ema + (1 - c.stress_ema) * part_stress)
            if not math.isnan(ema) and part_stress < c.local_gate * ema:
                continue  # calm Parts keep their connectivity

            free_op, nudged_op = part.operators()
            H = part.hidden_size
            sqrt_mass = 1.0 / free_op.inv_sqrt_mass
            grad_w = torch.zeros_like(part.W)
            grad_diag = torch.zeros_like(part.precision)
            grad_coupling = torch.zeros_like(part.coupling)
            drive_moments = torch.zeros_like(part.coupling)
            errors = torch.zeros_like(part.precision)
            share = 1.0 / len(visits)
            response = response_matrix(free_op).to(part.coupling.dtype)  # (H, H), d phi_i / d u_j
            for visit in visits:
                u = visit.drive.detach().reshape(-1, H)  # (N, H)
                source = visit.source.detach().reshape(-1, H)
                phi_f = visit.phi.detach().reshape(-1, H)
                z = targets[(visit.system, visit.position)].detach().reshape(-1, H)
                phi_n = settle(nudged_op, u, z).phi
                common = dict(alpha1=c.alpha1, lambda_e=c.lambda_e, degree_floor=c.degree_floor)
                g_n, d_n = connectivity_gradient(part.W, free_op, phi_n * sqrt_mass, u, weights, **common)
                g_f, d_f = connectivity_gradient(part.W, free_op, phi_f * sqrt_mass, u, weights, **common)
                # Equilibrium propagation: dLoss/dtheta ~ (dE/dtheta|nudged - dE/dtheta|free) / kappa_n.
                grad_w += share * (g_n - g_f) / c.nudge
                grad_diag += share * (d_n - d_f) / c.nudge
                # The field depends on U only through the coupled drive u = s + U s, so the
                # Part's own linear response R gives the error's gradient R^T (phi - z) s^T.
                grad_coupling += share * (weights[:, None] * ((phi_f - z) @ response)).T @ source
                drive_moments += share * (weights[:, None] * source).T @ source
                errors += share * (weights[:, None] * (phi_f - z) ** 2).sum(0)

            W = connectivity_step(part.W, part.mask, grad_w, part.mass, lr=c.local_lr, decay=c.local_decay,
                                  degree_floor=c.degree_floor)
            W = project_constraints(W, part.mask, c.degree_floor, c.degree_ceiling)
            if float(part.w_scale) > 0.0:
                W, scale = snap_to_int8_grid(W)
                part.w_scale.fill_(scale)
            part.W.copy_(W)
            part.precision.copy_(precision_step(part.precision, c.kappa0 * grad_diag, lr=c.precision_lr,
                                                low=c.precision_min, high=c.precision_max))
            part.mass.copy_(mass_step(part.mass, errors, lr=c.mass_lr, low=c.mass_min, high=c.mass_max))
            if float(part.drive_moments.trace()) <= 0.0:
                part.drive_moments.copy_(drive_moments)
            else:
                part.drive_moments.mul_(c.stress_ema).add_((1.0 - c.stress_ema) * drive_moments)
            part.coupling.copy_(coupling_step(part.coupling, grad_coupling, drive_moments, part.drive_moments,
                                              response, part.mass, lr=c.coupling_lr, decay=c.coupling_decay))
            part.local_steps += 1
            if int(part.local_steps) % c.eigen_refresh_interval == 0:
                part.n_modes.fill_(c.n_modes)
                part.invalidate()
            stepped.append(index)
        return stepped

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        context: int = 512,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample continuations of ids (B, T); returns (new ids (B, N), their log-probs (B, N))."""
        was_training = self.training
        self.eval()
        sequence = ids
        new_tokens, new_logprobs = [], []
        for _ in range(max_new_tokens):
            logits = self(sequence[:, -context:])[:, -1].float()  # (B, V)
            logprobs = torch.log_softmax(logits, dim=-1)
            if temperature <= 0:
                token = logprobs.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_probs, order = probs.sort(dim=-1, descending=True)
                    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
                    sorted_probs = sorted_probs * keep
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                token = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
            new_tokens.append(token)
            new_logprobs.append(logprobs.gather(-1, token[:, None]).squeeze(-1))
            sequence = torch.cat([sequence, token[:, None]], dim=1)
        if was_training:
            self.train()
        if not new_tokens:
            empty = ids.new_zeros(ids.shape[0], 0)
            return empty, empty.float()
        return torch.stack(new_tokens, 1), torch.stack(new_logprobs, 1)

    # ----------------------------------------------------------------- bookkeeping

    def parameter_count(self) -> int:
        """Trainable parameters plus the connectivity edges local learning may use."""
        macro = sum(p.numel() for p in self.parameters())
        edges = sum(int(part.mask.sum()) // 2 + 2 * part.hidden_size for part in self.parts)
        return macro + edges

    def invalidate_caches(self) -> None:
        for part in self.parts:
            part.invalidate()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Return the state dict on the CPU for storage, with the W of a Part on its int8 grid as int8."""
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        for index, part in enumerate(self.parts):
            scale = float(part.w_scale)
            if scale <= 0.0:
                continue
            key = f"parts.{index}.W"
            q = torch.round(state[key] / scale)
            # A W that left its grid (changed outside the local rule) keeps float storage.
            if torch.allclose(q * scale, state[key], rtol=0.0, atol=1e-6 * scale) and q.min() >= 0 and q.max() <= 127:
                state[key] = q.to(torch.int8)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Checkpoints written before Parts had an input coupling load with U = 0, the function
        # they were saved with, and with empty drive statistics. Those written before int8 W
        # load with float W. An int8 W is multiplied back by its grid step.
        state_dict = dict(state_dict)
        for index, part in enumerate(self.parts):
            scale_key = f"parts.{index}.w_scale"
            if scale_key not in state_dict:
                state_dict[scale_key] = torch.tensor(0.0)
            weight = state_dict.get(f"parts.{index}.W")
            if weight is not None and weight.dtype == torch.int8:
                scale = state_dict[scale_key]
                if float(scale) <= 0.0:
                    raise ValueError(f"parts.{index}.W is stored as int8 but its grid step w_scale is {float(scale)}, "
                                     "so the checkpoint is damaged. Restore it from a copy")
                weight = weight.to(part.W.dtype) * scale.to(part.W.dtype)
                state_dict[f"parts.{index}.W"] = weight
            for name in ("coupling", "drive_moments"):
                key = f"parts.{index}.{name}"
                if key not in state_dict and weight is not None:
                    state_dict[key] = torch.zeros_like(weight)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.invalidate_caches()
        return result

    def _apply(self, fn, recurse=True):
        # Moving the model (to a device or dtype) must drop caches built on the old tensors.
        result = super()._apply(fn, recurse)
        for part in self.parts:
            part.invalidate()
        return result


def tract_key(system: int, position: int) -> str:
    """ModuleDict key of the tract entering route position `position` of System `system`."""
    return f"s{system}_p{position}"
