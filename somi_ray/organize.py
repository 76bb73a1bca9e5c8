"""The self-organisation controller that learning loops call after every step.

    organizer = SelfOrganizer.from_flags(auto_grow=True, auto_compress=True)
    for step, batch in enumerate(batches):
        stats = model.learn_step(batch, optimizer)
        for event in organizer.after_step(model, stats, step, batch):
            lineage.append(event["kind"], event["details"], event["metrics"], bump_version=event["changed"])
        if organizer.optimizer_stale:
            optimizer = model.make_optimizer()
            organizer.optimizer_stale = False

One StressTracker reads the stress of every step; AutoGrow and AutoCompress decide from it.
Growth wins when both ask in the same step. A growth then stays on trial for `trial_windows`
stress windows. During the trial an ungrown copy learns on the same batches and nothing else
is decided. The growth is undone unless the grown model comes out ahead. Every change and
every verdict is returned as a lineage-ready event.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from somi_ray.compress import AutoCompress, CompressionPolicy, EvalFn, adopt_state
from somi_ray.grow import AutoGrow, GrowthPolicy, StressLevel, StressTracker, derived_patience, structure_summary
from somi_ray.integrity import WilsonDrift, wilson_loops
from somi_ray.model import LearnStats, SomiModel

logger = logging.getLogger(__name__)


@dataclass
class OrganizerPolicy:
    """Automatic growth and compression settings; None turns that half off."""

    grow: GrowthPolicy | None = field(default_factory=GrowthPolicy)
    compress: CompressionPolicy | None = field(default_factory=CompressionPolicy)
    patience: int | None = None  # steps per stress window; None derives it from the cascade and the batch size

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 2:
            raise ValueError(f"patience must be at least 2 steps per stress window, got {self.patience}")


@dataclass
class GrowthTrial:
    """A growth on probation: an ungrown copy learns on the same batches until the growth is judged."""

    kind: str
    step: int  # step of the growth
    steps: int  # steps until the judgement
    ungrown: SomiModel
    optimizer: torch.optim.Optimizer
    trigger: StressLevel | None = None  # stress of the window that asked for the growth
    grown_losses: list[float] = field(default_factory=list)
    ungrown_losses: list[float] = field(default_factory=list)
    grown_stress: list[float] = field(default_factory=list)
    ungrown_stress: list[float] = field(default_factory=list)


class SelfOrganizer:
    """Grow and compress a model by itself from the stress of its learning steps."""

    def __init__(self, policy: OrganizerPolicy | None = None, eval_fn: EvalFn | None = None):
        self.policy = policy or OrganizerPolicy()
        self.eval_fn = eval_fn  # model -> held-out bits per byte, measured around every event when given
        self.tracker = StressTracker(self.policy.patience)
        self.grower = AutoGrow(self.policy.grow) if self.policy.grow is not None else None
        self.compressor = AutoCompress(self.policy.compress) if self.policy.compress is not None else None
        self.optimizer_stale = False  # set after a change of parameters; the caller rebuilds its optimizer and clears it
        # Wilson traces are recorded once per stress window, so a compression may move each
        # loop no further than one window of ordinary learning does.
        self.wilson = WilsonDrift()
        self.trial: GrowthTrial | None = None  # the growth being judged, if any

    @classmethod
    def from_flags(cls, auto_grow: bool = True, auto_compress: bool = True,
                   eval_fn: EvalFn | None = None) -> "SelfOrganizer":
        """Controller with default policies for the halves that are switched on."""
        policy = OrganizerPolicy(
            grow=GrowthPolicy() if auto_grow else None,
            compress=CompressionPolicy() if auto_compress else None,
        )
        return cls(policy, eval_fn)

    def after_step(self, model: SomiModel, stats: LearnStats, step: int, batch: torch.Tensor) -> list[dict]:
        """Read one learning step's stress, grow or compress when the history calls for it; return the events.

        Each event is a dict with "kind" ("grow" or "compress"), "details" and "metrics", ready for
        `Lineage.append(kind, details, metrics)`. Its "changed" says whether the model changed,
        which is the version bump to record. A compression that was rolled back is a "compress"
        event with details["accepted"] False and metrics["rolled_back"] True, and the model is
        unchanged. The verdict of a growth trial is a "grow" event with details["action"]
        "trial". When the growth was undone, metrics["rolled_back"] is True and the model is
        its ungrown copy again.
        """
        self.tracker.configure(derived_patience(model.config, batch.numel()))
        self.tracker.push(stats.jepa_error, stats.stress_per_part)
        if self.tracker.steps_since_change % self.tracker.patience == 0:
            self.wilson.record(wilson_loops(model))
        if self.trial is not None:
            return self._continue_trial(model, stats, step, batch)

        if self.grower is not None:
            decision = self.grower.decide(model, self.tracker, step)
            if decision is not None:
                return [self._grow(model, decision, step)]

        if self.compressor is not None:
            plan = self.compressor.decide(model, self.tracker, step, batch)
            if plan is not None:
                return [self._compress(model, plan, step, batch)]
        return []

    def _grow(self, model: SomiModel, decision, step: int) -> dict:
        bpb_before = self.eval_fn(model) if self.eval_fn is not None else None
        trial_steps = self.grower.policy.trial_windows * int(self.tracker.patience)
        if trial_steps > 0:
            ungrown = copy.deepcopy(model)
            self.trial = GrowthTrial(decision.kind, step, trial_steps, ungrown, ungrown.make_optimizer(),
                                     decision.trigger)
        record = self.grower.apply(model, decision, self.tracker, step)
        self.wilson.last.clear()  # the loops of a new structure start a new series
        if self.compressor is not None:
            self.compressor.last_change_step = step
        self.optimizer_stale = True
        metrics = self._sizes(record["before"], record["after"])
        if self.eval_fn is not None:
            # Growth keeps the logits (the growth tests check it), so one evaluation serves both.
            metrics["bpb_before"] = metrics["bpb_after"] = bpb_before
        details = {"action": record["action"], "reason": record["reason"], "step": step, "automatic": True,
                   "trial_steps": trial_steps}
        return {"kind": "grow", "details": details, "metrics": metrics, "changed": True}

    def _continue_trial(self, model: SomiModel, stats: LearnStats, step: int, batch: torch.Tensor) -> list[dict]:
        """Take the ungrown copy's step on the same batch, and judge the growth once the trial is over.

        Both models learn from the same batches, so their difference measures the growth
        alone, not the data or the drift of stress while learning goes on. The growth stays
        when the grown model beats the copy by `min_gain` (relative) on held-out bits per byte,
        or on the training loss of the trial's second half without `eval_fn`. Otherwise the
        copy, with everything it learnt meanwhile, replaces the grown model.
        """
        trial = self.trial
        ungrown_stats = trial.ungrown.learn_step(batch, trial.optimizer)
        trial.grown_losses.append(stats.loss)
        trial.ungrown_losses.append(ungrown_stats.loss)
        trial.grown_stress.append(stats.jepa_error)
        trial.ungrown_stress.append(ungrown_stats.jepa_error)
        if len(trial.grown_losses) < trial.steps:
            return []
        self.trial = None
        return [self._end_trial(model, trial, step)]

    def finish(self, model: SomiModel) -> list[dict]:
        """End a growth trial that learning stopped in the middle of, and return its verdict event if any.

        A learner that stops for good calls this, because the organizer's history does not
        outlive it. The growth is judged on the steps it had. Without an evaluator and without
        a single step beside the copy, nothing shows a gain, so the growth is undone.
        """
        trial, self.trial = self.trial, None
        if trial is None:
            return []
        trial.steps = len(trial.grown_losses)
        return [self._end_trial(model, trial, trial.step + trial.steps)]

    def _compare(self, model: SomiModel, trial: GrowthTrial) -> tuple[str, float, float]:
        """Return what the trial measures and its value for the grown model and the ungrown copy."""
        if self.eval_fn is not None:
            return "held-out bits per byte", self.eval_fn(model), self.eval_fn(trial.ungrown)
        if not trial.grown_losses:
            return "training loss (no step on trial)", 0.0, 0.0
        half = len(trial.grown_losses) // 2
        return ("training loss", float(np.mean(trial.grown_losses[half:])),
                float(np.mean(trial.ungrown_losses[half:])))

    def _end_trial(self, model: SomiModel, trial: GrowthTrial, step: int) -> dict:
        """Keep or undo the growth on trial, and return the verdict as a lineage-ready event."""
        before = structure_summary(model)
        measure, grown, ungrown = self._compare(model, trial)

        gain = (ungrown - grown) / max(abs(ungrown), 1e-12)
        paid = gain >= self.grower.policy.min_gain
        verdict = "kept" if paid else "undone"
        reason = (f"after {trial.steps} steps beside an ungrown copy, {measure} {grown:.4f} against {ungrown:.4f} "
                  f"(gain {100 * gain:+.2f} %, needed {100 * self.grower.policy.min_gain:.2f} %): growth {verdict}")
        # An undone kind is remembered at the ungrown copy's stress, the level of the structure
        # that stays. A new Part shifts the mean stress, so the grown model's level would not fit.
        half = len(trial.grown_stress) // 2
        kept_stress = (trial.grown_stress if paid else trial.ungrown_stress)[half:]
        if kept_stress and len(self.tracker.values) >= 3:
            level = StressLevel(float(np.mean(kept_stress)), self.tracker.last().sd)
        else:  # a trial that ended before it measured stress keeps the level of its trigger
            level = trial.trigger or StressLevel(float("nan"), 0.0)

        if not paid:
            adopt_state(model, trial.ungrown)
            self.optimizer_stale = True
            self.tracker.reset()
            self.wilson.last.clear()
        elif trial.trigger is not None and self.tracker.baseline is None and kept_stress:
            # Both models saw the same batches, so their stress difference moves the trigger onto
            # the grown model's level. A rise before the new structure has a baseline still counts.
            offset = float(np.mean(trial.grown_stress[half:]) - np.mean(trial.ungrown_stress[half:]))
            self.tracker.reference = StressLevel(trial.trigger.mean + offset, trial.trigger.sd)
        self.grower.judge_trial(trial.kind, paid, level, step)
        if self.compressor is not None:
            self.compressor.last_change_step = step
        logger.info("growth trial of kind %s from step %d: %s", trial.kind, trial.step, reason)

        metrics = self._sizes(before, structure_summary(model))
        metrics["rolled_back"] = not paid
        metrics["gain"] = gain
        if self.eval_fn is not None:
            metrics["bpb_before"], metrics["bpb_after"] = grown, (grown if paid else ungrown)
        details = {"action": "trial", "grown_kind": trial.kind, "reason": reason, "accepted": paid, "step": step,
                   "automatic": True, "measure": measure}
        return {"kind": "grow", "details": details, "metrics": metrics, "changed": not paid}

    def _compress(self, model: SomiModel, plan, step: int, batch: torch.Tensor) -> dict:
        result = self.compressor.apply(model, plan, batch, step, self.eval_fn, self.wilson.tolerances(), self.tracker)
        if self.grower is not None:
            self.grower.last_change_step = step
        if result.accepted:
            self.optimizer_stale = True
            # A smaller model starts a new history. The old baseline becomes the reference
            # for rises, and the next compression waits for a baseline of the new structure.
            self.tracker.reset()
            self.wilson.last.clear()
            if self.grower is not None:
                # Stress falls back while the smaller model relearns. That recovery is not a
                # learning plateau, so it must not trigger growth.
                self.grower.plateau_seen = True
        metrics = {key: value for key, value in result.metrics.items() if key not in ("before", "after")}
        metrics.update(self._sizes(result.metrics["before"], result.metrics["after"]))
        metrics["rolled_back"] = not result.accepted
        if "bpb_before" in metrics:
            metrics["bpb_after"] = metrics["bpb_after"] if result.accepted else metrics["bpb_before"]
            metrics["bpb_candidate"] = result.metrics["bpb_after"]
        details = dict(result.details, reason=result.reason, accepted=result.accepted, step=step, automatic=True)
        return {"kind": "compress", "details": details, "metrics": metrics, "changed": result.accepted}

    @staticmethod
    def _sizes(before: dict, after: dict) -> dict:
        metrics = {}
        for key in ("parameters", "hidden_size", "n_parts", "n_systems"):
            metrics[f"{key}_before"] = before[key]
            metrics[f"{key}_after"] = after[key]
        return metrics


def current_structure(model: SomiModel) -> dict:
    """Hidden size, Parts, Systems and parameter count of a model, for progress reports."""
    return structure_summary(model)
