"""The self-organisation controller that learning loops call after every step.

    organizer = SelfOrganizer.from_flags(auto_grow=True, auto_compress=True)
    for step, batch in enumerate(batches):
        stats = model.learn_step(batch, optimizer)
        for event in organizer.after_step(model, stats, step, batch):
            lineage.append(event["kind"], event["details"], event["metrics"])
        if organizer.optimizer_stale:
            optimizer = model.make_optimizer()
            organizer.optimizer_stale = False

One StressTracker reads the stress of every step; AutoGrow and AutoCompress decide from it.
Growth wins when both ask in the same step. Every change is returned as a lineage-ready event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from somi_ray.compress import AutoCompress, CompressionPolicy, EvalFn
from somi_ray.grow import AutoGrow, GrowthPolicy, StressTracker, derived_patience, structure_summary
from somi_ray.integrity import WilsonDrift, wilson_loops
from somi_ray.model import LearnStats, SomiModel

logger = logging.getLogger(__name__)


@dataclass
class OrganizerPolicy:
    """Automatic growth and compression settings; None turns that half off."""

    grow: GrowthPolicy | None = field(default_factory=GrowthPolicy)
    compress: CompressionPolicy | None = field(default_factory=CompressionPolicy)
    patience: int | None = None  # steps per stress window; None derives it from the cascade and the batch size


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
        `Lineage.append(kind, details, metrics)`. A compression that was rolled back is returned
        as a "compress" event with details["accepted"] False and metrics["rolled_back"] True; the
        model is unchanged then, so the caller may record it without a version bump.
        """
        self.tracker.configure(derived_patience(model.config, batch.numel()))
        self.tracker.push(stats.jepa_error, stats.stress_per_part)
        if self.tracker.steps_since_change % self.tracker.patience == 0:
            self.wilson.record(wilson_loops(model))

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
        record = self.grower.apply(model, decision, self.tracker, step)
        self.wilson.last.clear()  # the loops of a new structure start a new series
        if self.compressor is not None:
            self.compressor.last_change_step = step
        self.optimizer_stale = True
        metrics = self._sizes(record["before"], record["after"])
        if self.eval_fn is not None:
            metrics["bpb_before"] = bpb_before
            metrics["bpb_after"] = self.eval_fn(model)
        details = {"action": record["action"], "reason": record["reason"], "step": step, "automatic": True}
        return {"kind": "grow", "details": details, "metrics": metrics}

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
        metrics = {key: value for key, value in result.metrics.items() if key not in ("before", "after")}
        metrics.update(self._sizes(result.metrics["before"], result.metrics["after"]))
        metrics["rolled_back"] = not result.accepted
        if "bpb_before" in metrics:
            metrics["bpb_after"] = metrics["bpb_after"] if result.accepted else metrics["bpb_before"]
            metrics["bpb_candidate"] = result.metrics["bpb_after"]
        details = dict(result.details, reason=result.reason, accepted=result.accepted, step=step, automatic=True)
        return {"kind": "compress", "details": details, "metrics": metrics}

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
