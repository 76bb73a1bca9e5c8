"""Compression of an over-provisioned model, with post-compression calibration and rollback.

A compression removes what the model can afford to lose:

- dark-matter features: heavy (high mass), poorly connected (low conductivity sum_j W_ij)
  and barely read by the decoder (small decoder column norm);
- spectrally redundant features: features of the decoder's input that the other features
  predict almost exactly (a variance inflation test on a calibration batch);
- low-stress edges: edges that local learning let decay far below their row's mean weight,
  because equilibrium propagation strengthens only the edges that stress supports;
- optionally, float precision of W: W moves onto an int8 grid and is stored as int8.

The removed features' share of the logits is folded into the kept decoder columns by least
squares. Then the norm gains (`final_gain`, every Part's `drive_gain`) and the decoder bias are
refitted on a calibration batch to match the logits from before the compression. Everything
happens on a copy, which replaces the model only when held-out bits per byte and the logit
drift stay within tolerance, so a rejected compression leaves the model untouched.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from somi_ray.grow import StressTracker, recalibrate_structure, structure_summary
from somi_ray.integrity import compare_loops, wilson_loops
from somi_ray.model import SomiModel
from somi_ray.physics.laplacian import project_constraints, snap_to_int8_grid

logger = logging.getLogger(__name__)

EvalFn = Callable[[SomiModel], float]  # model -> held-out bits per byte


@dataclass
class CompressionPolicy:
    """When automatic compression triggers, what it may remove and what it must keep."""

    low_sigmas: float = 3.0  # a window mean this many step-level sds below the baseline is sustained low stress
    calm_windows: int = 4  # windows of stable stress, not above the baseline, that make a structure settled
    stress_sigmas: float = 1.0  # a compression may raise the guard batch's stress by this many baseline sds
    dark_sigmas: float = 1.5  # combined robust z-score above which a feature is dark matter
    redundancy_r2: float = 0.98  # a feature the others predict with R^2 above this is redundant
    # A candidate joins a plan only when removing it alone, on a copy, moves the logits of the
    # calibration inputs by at most this mean KL (nats per token). math.inf skips the test.
    removal_kl: float = 0.005
    low_saliency: bool = True  # also propose the features whose removal alone costs under removal_kl
    max_remove_fraction: float = 0.25  # most features one compression removes, as a share of H
    min_hidden: int = 16  # H never shrinks below this
    edge_fraction: float = 0.05  # edges below this share of their row's mean edge weight are pruned
    int8_weights: bool = False  # put W on an int8 grid and store it as int8
    calibration_steps: int = 50  # Adam steps of the post-compression calibration
    calibration_lr: float = 0.02  # Adam learning rate of the calibration
    bpb_tolerance: float = 0.02  # relative rise of held-out bits per byte that rolls a compression back
    drift_tolerance: float = 0.1  # mean KL (nats per token) from the old logits that rolls a compression back
    cooldown: int | None = None  # steps after any structural change before the next compression; None = patience

    def __post_init__(self) -> None:
        if not 0.0 < self.max_remove_fraction < 1.0:
            raise ValueError(f"max_remove_fraction must be in (0, 1), got {self.max_remove_fraction}")
        if self.min_hidden < 3:
            raise ValueError(f"min_hidden must be at least 3 (K needs H - 1 >= 2), got {self.min_hidden}")
        for name in ("low_sigmas", "stress_sigmas"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be a positive number of standard deviations, got {getattr(self, name)}")
        for name in ("removal_kl", "bpb_tolerance", "drift_tolerance", "edge_fraction", "calibration_lr"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be zero or more, got {getattr(self, name)}")
        if self.calm_windows < 1 or self.calibration_steps < 0:
            raise ValueError(f"calm_windows must be at least 1 and calibration_steps at least 0, got "
                             f"{self.calm_windows} and {self.calibration_steps}")
        if self.cooldown is not None and self.cooldown < 0:
            raise ValueError(f"cooldown must be zero or more steps, got {self.cooldown}")


@dataclass
class CompressionPlan:
    """The features, edges and weight format that one compression changes."""

    remove: list[int] = field(default_factory=list)  # feature indices to remove
    reasons: dict[int, str] = field(default_factory=dict)  # feature -> "dark-matter", "redundant" or "low-saliency"
    removal_kl: dict[int, float] = field(default_factory=dict)  # feature -> measured KL of removing it alone
    prune_edges: bool = True
    int8_weights: bool = False
    trigger: str = ""  # why AutoCompress asked for this plan, with the numbers that decided it

    def describe(self) -> dict:
        dark = sorted(i for i, r in self.reasons.items() if r == "dark-matter")
        redundant = sorted(i for i, r in self.reasons.items() if r == "redundant")
        quiet = sorted(i for i, r in self.reasons.items() if r == "low-saliency")
        return {"dark_matter_features": dark, "redundant_features": redundant, "low_saliency_features": quiet,
                "removal_kl": {str(i): round(kl, 6) for i, kl in sorted(self.removal_kl.items())},
                "prune_edges": self.prune_edges, "int8_weights": self.int8_weights, "trigger": self.trigger}


@dataclass
class CompressionResult:
    """Outcome of one compression attempt."""

    accepted: bool
    reason: str  # why it was kept or rolled back
    details: dict  # what was done
    metrics: dict  # what was measured before and after


# ---------------------------------------------------------------------------------------------
# Finding what to remove


def decoder_inputs(model: SomiModel, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits (B, T, V), decoder input (B*T, H)) of one eval-mode forward pass."""
    captured: list[torch.Tensor] = []
    handle = model.decoder.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    return logits, captured[0].reshape(-1, captured[0].shape[-1])


def _robust_z(values: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 MAD): a z-score that a few extreme features cannot inflate."""
    median = values.median()
    mad = (values - median).abs().median() * 1.4826
    return (values - median) / mad.clamp_min(1e-12)


def dark_matter_scores(model: SomiModel) -> torch.Tensor:
    """Score (H,) per feature: high mass, low conductivity and a small decoder column all raise it.

    Each signal is a robust z-score of its logarithm. The score is their mean, and it is
    set to -inf where any signal points the other way, so only features that are dark in
    all three respects qualify.
    """
    log_mass = torch.stack([part.mass.log() for part in model.parts]).mean(0)  # (H,)
    conductivity = torch.stack([part.W.sum(1) for part in model.parts]).mean(0)  # (H,)
    log_conductivity = conductivity.clamp_min(1e-8).log()
    readout = model.decoder.weight.detach().norm(dim=0) * model.final_gain.detach().abs()  # (H,)
    log_readout = readout.clamp_min(1e-12).log()

    z_mass, z_cond, z_read = _robust_z(log_mass), _robust_z(log_conductivity), _robust_z(log_readout)
    score = (z_mass - z_cond - z_read) / 3.0
    agrees = (z_mass > 0) & (z_cond < 0) & (z_read < 0)
    return torch.where(agrees, score, torch.full_like(score, -math.inf))


def redundant_features(hidden: torch.Tensor, r2_threshold: float, limit: int,
                       exclude: set[int] | None = None) -> list[int]:
    """Greedily pick features of `hidden` (N, H) that the remaining ones predict with R^2 > threshold.

    R^2 of feature j regressed on all others is 1 - 1 / (C^-1)_jj for the correlation matrix
    C. The most predictable feature goes first, then R^2 is recomputed without it.
    """
    exclude = set(exclude or ())
    kept = [j for j in range(hidden.shape[1]) if j not in exclude]
    chosen: list[int] = []
    x = hidden.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    while len(chosen) < limit and len(kept) > 2:
        corr = (x[:, kept].T @ x[:, kept]) / max(x.shape[0] - 1, 1)  # (k, k)
        corr = corr + 1e-6 * torch.eye(len(kept), dtype=corr.dtype)
        r2 = 1.0 - 1.0 / torch.linalg.inv(corr).diagonal()  # (k,)
        best = int(torch.argmax(r2))
        if float(r2[best]) <= r2_threshold:
            break
        chosen.append(kept.pop(best))
    return chosen


def removal_cost(model: SomiModel, inputs: torch.Tensor, feature: int, hidden: torch.Tensor,
                 reference_logits: torch.Tensor) -> float:
    """Measure the mean KL (nats per token) of the logits on `inputs` after removing one feature.

    The removal runs on a copy with the same decoder fold as a real compression, so the cost
    includes what the feature did inside every Part, not only its share of the readout.
    """
    H = model.config.hidden_size
    candidate = copy.deepcopy(model)
    shrink_hidden(candidate, [i for i in range(H) if i != feature], fold_from=hidden)
    candidate.eval()
    with torch.no_grad():
        return float(mean_kl(reference_logits, candidate(inputs)))


def plan_compression(model: SomiModel, inputs: torch.Tensor, policy: CompressionPolicy,
                     strength: float = 1.0) -> CompressionPlan:
    """Choose features to remove, at most strength * max_remove_fraction of H.

    Candidates are, in this order, dark-matter features, redundant features and, with
    `low_saliency`, the features with the smallest share of the logits. Each candidate is
    removed alone on a copy, and it joins the plan only when that moves the logits by at most
    `removal_kl`. Measuring stops once the plan is full.
    """
    H = model.config.hidden_size
    limit = min(int(H * policy.max_remove_fraction * strength), H - policy.min_hidden)
    plan = CompressionPlan(prune_edges=policy.edge_fraction > 0, int8_weights=policy.int8_weights)
    if limit <= 0:
        return plan

    candidates: dict[int, str] = {}
    scores = dark_matter_scores(model)
    for feature in torch.argsort(scores, descending=True).tolist():
        if len(candidates) >= limit or not scores[feature] > policy.dark_sigmas:
            break
        candidates[feature] = "dark-matter"

    logits, hidden = decoder_inputs(model, inputs)
    for feature in redundant_features(hidden, policy.redundancy_r2, limit, set(candidates)):
        candidates[feature] = "redundant"
    if policy.low_saliency:
        # A feature's share of the logits is its mean square at the decoder input times the
        # squared norm of its decoder column. The smallest shares are the likeliest to be cheap.
        share = hidden.pow(2).mean(0) * model.decoder.weight.detach().pow(2).sum(0)
        quiet = [f for f in torch.argsort(share).tolist() if f not in candidates][:limit]
        for feature in quiet:
            candidates[feature] = "low-saliency"

    for feature, reason in candidates.items():
        if len(plan.remove) >= limit:
            break
        if not math.isinf(policy.removal_kl):
            cost = removal_cost(model, inputs, feature, hidden, logits)
            if cost > policy.removal_kl:
                continue
            plan.removal_kl[feature] = cost
        plan.remove.append(feature)
        plan.reasons[feature] = reason
    plan.remove.sort()
    return plan


def prunable_edges(model: SomiModel, fraction: float) -> int:
    """Count the edges (i < j) below `fraction` of their rows' mean edge weight."""
    return sum(int(_weak_edges(part.W, part.mask, fraction).sum()) // 2 for part in model.parts)


def _weak_edges(W: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    edge_count = mask.sum(1).clamp_min(1)
    row_mean = (W * mask).sum(1) / edge_count  # (H,)
    threshold = fraction * torch.minimum(row_mean[:, None], row_mean[None, :])  # (H, H), symmetric
    return mask & (W < threshold)


# ---------------------------------------------------------------------------------------------
# Compression operations (in place, on the copy that compress() works on)


@torch.no_grad()
def shrink_hidden(model: SomiModel, keep: list[int], fold_from: torch.Tensor | None = None) -> None:
    """Keep only features `keep` everywhere: embeddings, decoder, gains, every Part and tract.

    With `fold_from` (the decoder input (N, H) on a calibration batch), the removed features'
    contribution to the logits is regressed on the kept features and added to their decoder
    columns and the bias, so the decoder keeps most of the signal it read before.
    The model's norm width (config.norm_width) stays, as it is fixed at creation.
    """
    config = model.config
    H = config.hidden_size
    keep_index = torch.tensor(sorted(keep), dtype=torch.long, device=model.device)
    removed = torch.tensor([i for i in range(H) if i not in set(keep)], dtype=torch.long, device=model.device)
    assert len(keep_index) >= 3, f"shrinking to {len(keep_index)} features leaves too few (at least 3)"

    decoder = model.decoder.weight.data  # (V, H)
    bias = model.decoder.bias.data.clone()  # (V,)
    new_decoder = decoder[:, keep_index].clone()  # (V, H')
    if fold_from is not None and len(removed):
        h = fold_from.double()
        h_keep, h_removed = h[:, keep_index], h[:, removed]
        mean_keep, mean_removed = h_keep.mean(0), h_removed.mean(0)
        beta = torch.linalg.lstsq(h_keep - mean_keep, h_removed - mean_removed).solution  # (H', R)
        offset = mean_removed - mean_keep @ beta  # (R,)
        d_removed = decoder[:, removed].double()  # (V, R)
        new_decoder += (d_removed @ beta.T).to(decoder.dtype)
        bias += (d_removed @ offset).to(decoder.dtype)

    model.embedding.weight = nn.Parameter(model.embedding.weight.data[:, keep_index].clone())
    model.embedding.embedding_dim = len(keep_index)
    model.target_embedding = model.target_embedding[:, keep_index].clone()
    model.decoder.weight = nn.Parameter(new_decoder)
    model.decoder.bias = nn.Parameter(bias)
    model.decoder.in_features = len(keep_index)
    model.final_gain = nn.Parameter(model.final_gain.data[keep_index].clone())

    for part in model.parts:
        part.W = part.W[keep_index][:, keep_index].clone()
        part.mask = part.mask[keep_index][:, keep_index].clone()
        part.W = project_constraints(part.W, part.mask, config.degree_floor, config.degree_ceiling)
        part.mass = part.mass[keep_index].clone()
        part.precision = part.precision[keep_index].clone()
        part.coupling = part.coupling[keep_index][:, keep_index].clone()
        part.drive_moments = part.drive_moments[keep_index][:, keep_index].clone()
        for name in ("output_gain", "drive_gain", "context_gain"):
            setattr(part, name, nn.Parameter(getattr(part, name).data[keep_index].clone()))
        part.invalidate()

    for tract in model.tracts.values():
        tract.down = nn.Parameter(tract.down.data[keep_index].clone())
        tract.up = nn.Parameter(tract.up.data[keep_index].clone())

    config.hidden_size = len(keep_index)
    recalibrate_structure(model)
    for part in model.parts:
        # The eigen cache must keep fewer modes than the smaller H.
        part.n_modes.fill_(min(int(part.n_modes), config.n_modes))
        part.invalidate()


@torch.no_grad()
def prune_weak_edges(model: SomiModel, fraction: float) -> int:
    """Remove edges below `fraction` of their rows' mean weight from W and its mask; return the count."""
    config = model.config
    pruned = 0
    for part in model.parts:
        weak = _weak_edges(part.W, part.mask, fraction)
        pruned += int(weak.sum()) // 2
        part.mask = part.mask & ~weak
        part.W = project_constraints(part.W * part.mask, part.mask, config.degree_floor, config.degree_ceiling)
        part.invalidate()
    return pruned


@torch.no_grad()
def quantize_connectivity(model: SomiModel) -> float:
    """Put every Part's W on its int8 grid, and return the largest relative Frobenius error.

    From then on the local rule keeps W on the grid, and checkpoints store it as int8 with
    one float step per Part, a quarter of the float32 size.
    """
    worst = 0.0
    for part in model.parts:
        restored, scale = snap_to_int8_grid(part.W)
        error = float((restored - part.W).norm() / part.W.norm().clamp_min(1e-12))
        worst = max(worst, error)
        part.W = restored
        part.w_scale.fill_(scale)
        part.invalidate()
    return worst


# ---------------------------------------------------------------------------------------------
# Calibration and the guarded compression


def calibration_parameters(model: SomiModel) -> list[nn.Parameter]:
    """Return the norm gains and the decoder bias, the parameters that post-compression calibration refits."""
    return [model.final_gain, model.decoder.bias] + [part.drive_gain for part in model.parts]


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || model) in nats."""
    reference = F.log_softmax(reference_logits.flatten(0, -2).float(), dim=-1)
    current = F.log_softmax(logits.flatten(0, -2).float(), dim=-1)
    return F.kl_div(current, reference, log_target=True, reduction="batchmean")


def calibrate(model: SomiModel, inputs: torch.Tensor, reference_logits: torch.Tensor,
              steps: int, lr: float) -> tuple[float, float]:
    """Refit the norm gains and the decoder bias so the logits of `inputs` match `reference_logits`.

    Runs `steps` Adam steps on mean KL(reference || model) in eval mode with every other
    parameter frozen. Returns (KL before, KL after) in nats per token.
    """
    params = calibration_parameters(model)
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    saved = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        with torch.no_grad():
            before = float(mean_kl(reference_logits, model(inputs)))
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = mean_kl(reference_logits, model(inputs))
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = float(mean_kl(reference_logits, model(inputs)))
    finally:
        for p, flag in zip(frozen, saved):
            p.requires_grad_(flag)
        model.train(was_training)
    return before, after


def bits_per_token(model: SomiModel, batch: torch.Tensor) -> float:
    """Mean next-token cross-entropy of windows (B, T+1) in bits, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(batch[:, :-1])
        nats = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    model.train(was_training)
    return float(nats) / math.log(2.0)


def compress(model: SomiModel, plan: CompressionPlan, batch: torch.Tensor, policy: CompressionPolicy,
             eval_fn: EvalFn | None = None, wilson_tolerances: dict[int, float] | None = None,
             stress_tolerance: float | None = None) -> CompressionResult:
    """Apply a plan to a copy of the model, calibrate it and keep it only if it passes the guards.

    `batch` (B, T+1) with B >= 2 is split: the first half calibrates, the second half measures
    logit drift, and, without `eval_fn`, also the bits per token that stand in for held-out
    bits per byte. With `wilson_tolerances` (relative change of each System's Wilson trace,
    for example `WilsonDrift.tolerances()`), a loop that moves further also rolls back. With
    `stress_tolerance`, so does a rise of the guard half's mean stress beyond it: a smaller
    model under more stress would only ask to grow back.
    On acceptance the model takes over the copy's state in place, so the caller must rebuild
    its optimizer. On rejection the model is left exactly as it was.
    """
    assert batch.dim() == 2, f"compression needs a batch (B, T+1), got shape {tuple(batch.shape)}"
    assert batch.shape[0] >= 2, f"compression needs at least 2 windows to split, got {batch.shape[0]}"
    half = batch.shape[0] // 2
    calibration, guard = batch[:half], batch[half:]
    calibration_logits, hidden = decoder_inputs(model, calibration[:, :-1])
    guard_logits, _ = decoder_inputs(model, guard[:, :-1])
    before = structure_summary(model)
    score_before = eval_fn(model) if eval_fn is not None else bits_per_token(model, guard)
    loops_before = wilson_loops(model)
    stress_before = float(model.measure_stress(guard)["per_token"].mean())

    candidate = copy.deepcopy(model)
    details: dict = {"plan": plan.describe(), "features_removed": len(plan.remove)}
    if plan.remove:
        keep = [i for i in range(model.config.hidden_size) if i not in set(plan.remove)]
        shrink_hidden(candidate, keep, fold_from=hidden)
    if plan.prune_edges:
        details["edges_pruned"] = prune_weak_edges(candidate, policy.edge_fraction)
    if plan.int8_weights:
        details["int8_relative_error"] = quantize_connectivity(candidate)
    kl_raw, kl_calibrated = calibrate(candidate, calibration[:, :-1], calibration_logits,
                                      policy.calibration_steps, policy.calibration_lr)

    with torch.no_grad():
        candidate.eval()
        drift = float(mean_kl(guard_logits, candidate(guard[:, :-1])))
    score_after = eval_fn(candidate) if eval_fn is not None else bits_per_token(candidate, guard)
    after = structure_summary(candidate)
    score_name = "bpb" if eval_fn is not None else "guard_bits_per_token"
    metrics = {
        "before": before, "after": after,
        f"{score_name}_before": score_before, f"{score_name}_after": score_after,
        "calibration_kl_before": kl_raw, "calibration_kl_after": kl_calibrated, "guard_kl": drift,
    }

    wilson = compare_loops(loops_before, wilson_loops(candidate),
                           wilson_tolerances if wilson_tolerances is not None else math.inf)
    metrics["wilson_changes"] = wilson.changes
    metrics["wilson_tolerances"] = wilson.tolerances
    stress_after = float(candidate.measure_stress(guard)["per_token"].mean())
    metrics["stress_before"], metrics["stress_after"] = stress_before, stress_after

    rise = (score_after - score_before) / max(abs(score_before), 1e-12)
    if rise > policy.bpb_tolerance:
        reason = f"{score_name} rose {rise:.2%} (> {policy.bpb_tolerance:.2%}): rolled back"
        accepted = False
    elif drift > policy.drift_tolerance:
        reason = f"logit drift {drift:.4f} nats > {policy.drift_tolerance}: rolled back"
        accepted = False
    elif stress_tolerance is not None and stress_after - stress_before > stress_tolerance:
        reason = (f"stress rose {stress_before:.4f} -> {stress_after:.4f} "
                  f"(> {stress_tolerance:.4f}): rolled back")
        accepted = False
    elif wilson.exceeded:
        moved = ", ".join(f"System {system} {wilson.changes[system]:.3g} > {wilson.tolerances[system]:.3g}"
                          for system in wilson.exceeded)
        reason = f"Wilson loops moved beyond their tolerance ({moved}): rolled back"
        accepted = False
    else:
        reason = f"{score_name} changed {rise:+.2%}, drift {drift:.4f} nats: kept"
        accepted = True

    if accepted:
        adopt_state(model, candidate)
    logger.info("compression %s: H %d -> %d, parameters %d -> %d, %s %.4f -> %.4f",
                "kept" if accepted else "rolled back", before["hidden_size"], after["hidden_size"],
                before["parameters"], after["parameters"], score_name, score_before, score_after)
    return CompressionResult(accepted=accepted, reason=reason, details=details, metrics=metrics)


def adopt_state(model: SomiModel, candidate: SomiModel) -> None:
    """Make `model` the candidate in place, so callers holding `model` see the compressed one.

    Modules keep their parameters, buffers, submodules and config in their `__dict__`. The
    candidate is a deep copy of `model`, so taking over its `__dict__` moves all of it.
    """
    model.__dict__.update(candidate.__dict__)
    model.invalidate_caches()


# ---------------------------------------------------------------------------------------------
# Automatic compression


class AutoCompress:
    """Decide when a model is over-provisioned and compress it behind the guards.

    It triggers on sustained low stress, in one of two forms:

    - a drop: the last window of stress sits `low_sigmas` step-level sds below the baseline
      (the stable stress adopted at the current structure), and the model has something to
      remove: features it can afford to lose, or weak edges;
    - a settled structure: the structure has not changed for `calm_windows` windows, stress is
      stable and at most one sd above the baseline, so no growth is due, and the model has
      features it can afford to lose (see `plan_compression`). Weak edges alone do not count here.

    The second form exists because stress need not fall on text the model memorises. On
    one act of a play repeated, the training loss fell while the JEPA stress stayed level or
    rose, because the target encoder follows an embedding that keeps changing. A rolled-back
    attempt halves the strength (the share of features removed) and doubles the cooldown
    before the next one.
    """

    def __init__(self, policy: CompressionPolicy | None = None):
        self.policy = policy or CompressionPolicy()
        self.last_change_step: int | None = None
        self.strength = 1.0
        self.backoff = 1
        self.last_plan_step: int | None = None  # plans cost a forward pass per candidate, so at most one per window

    def cooldown(self, tracker: StressTracker) -> int:
        base = self.policy.cooldown if self.policy.cooldown is not None else int(tracker.patience)
        return base * self.backoff

    def decide(self, model: SomiModel, tracker: StressTracker, step: int, batch: torch.Tensor) -> CompressionPlan | None:
        """Return a compression plan when stress has stayed low and there is something to remove."""
        if self.last_change_step is not None and step - self.last_change_step < self.cooldown(tracker):
            return None
        if not tracker.ready:
            return None
        tracker.update_baseline(self.policy.low_sigmas)
        # Only a baseline adopted at this structure counts: stress below the reference of
        # the last change means that change paid off, not that the model is too large.
        if tracker.baseline is None:
            return None
        deviation = tracker.deviation()
        dropped = -deviation >= self.policy.low_sigmas
        settled = (tracker.steps_since_change >= self.policy.calm_windows * tracker.patience
                   and tracker.stable() and deviation <= 1.0)
        if not (dropped or settled):
            return None
        if self.last_plan_step is not None and step - self.last_plan_step < tracker.patience:
            return None

        self.last_plan_step = step
        plan = plan_compression(model, batch[:, :-1], self.policy, self.strength)
        baseline = tracker.baseline.mean
        if dropped:
            plan.trigger = f"stress {tracker.last().mean:.4f} fell {-deviation:.1f} sd below its baseline {baseline:.4f}"
        else:
            plan.trigger = (f"structure settled for {tracker.steps_since_change} steps with stress "
                            f"{tracker.last().mean:.4f} within {max(deviation, 0.0):.1f} sd of its baseline {baseline:.4f}")
            return plan if plan.remove else None
        weak = prunable_edges(model, self.policy.edge_fraction) if plan.prune_edges else 0
        if not plan.remove and weak == 0 and not plan.int8_weights:
            return None
        return plan

    def apply(self, model: SomiModel, plan: CompressionPlan, batch: torch.Tensor, step: int,
              eval_fn: EvalFn | None = None, wilson_tolerances: dict[int, float] | None = None,
              tracker: StressTracker | None = None) -> CompressionResult:
        stress_tolerance = None
        if tracker is not None:
            level = tracker.baseline or tracker.reference
            if level is not None:
                stress_tolerance = self.policy.stress_sigmas * level.sd
        result = compress(model, plan, batch, self.policy, eval_fn, wilson_tolerances, stress_tolerance)
        self.last_change_step = step
        if result.accepted:
            self.strength, self.backoff = 1.0, 1
        else:
            self.strength /= 2.0
            self.backoff *= 2
            logger.warning("compression at step %d rolled back (%s); next attempt at strength %.2f, cooldown x%d",
                           step, result.reason, self.strength, self.backoff)
        return result
