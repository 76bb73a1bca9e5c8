"""SelfOrganizer: events, optimizer flag and switches, on a real short Shakespeare run."""

import json

import numpy as np
import torch

from somi_ray.compress import CompressionPolicy
from somi_ray.config import SomiConfig
from somi_ray.grow import GrowthPolicy
from somi_ray.lineage import EVENT_KINDS, Lineage
from somi_ray.model import SomiModel
from somi_ray.organize import OrganizerPolicy, SelfOrganizer
from tests.model_fixtures import shakespeare_byte_batches


def test_from_flags_switches_halves():
    both = SelfOrganizer.from_flags(auto_grow=True, auto_compress=True)
    assert both.grower is not None
    assert both.compressor is not None
    grow_only = SelfOrganizer.from_flags(auto_grow=True, auto_compress=False)
    assert grow_only.compressor is None
    neither = SelfOrganizer.from_flags(auto_grow=False, auto_compress=False)
    assert neither.grower is None
    assert neither.compressor is None


def test_short_run_events_are_lineage_ready():
    torch.manual_seed(0)
    model = SomiModel(SomiConfig.from_scratch())
    optimizer = model.make_optimizer()
    policy = OrganizerPolicy(grow=GrowthPolicy(max_hidden=24), compress=CompressionPolicy(calibration_steps=3),
                             patience=8)
    calls = []

    def eval_fn(m):
        calls.append(m.config.hidden_size)
        return 5.0

    organizer = SelfOrganizer(policy, eval_fn=eval_fn)
    lineage = Lineage()
    batches = shakespeare_byte_batches(4, 16, seed=0, n_bytes=200_000)
    for step in range(70):
        batch = next(batches)
        stats = model.learn_step(batch, optimizer)
        for event in organizer.after_step(model, stats, step, batch):
            assert event["kind"] in ("grow", "compress")
            assert event["kind"] in EVENT_KINDS
            json.dumps(event)
            lineage.append(event["kind"], event["details"], event["metrics"])
        if organizer.optimizer_stale:
            optimizer = model.make_optimizer()
            organizer.optimizer_stale = False
    assert organizer.tracker.patience == 8
    assert 0 < len(organizer.tracker.values) <= 16  # two windows at most; a change starts a new history
    for event in lineage:
        metrics = event.metrics
        for key in ("parameters_before", "parameters_after", "hidden_size_before", "hidden_size_after",
                    "n_parts_before", "n_parts_after", "bpb_before", "bpb_after"):
            assert key in metrics, key
        assert event.details["reason"]
    if any(event.kind == "grow" for event in lineage):
        assert any(event.metrics["hidden_size_after"] == 24 for event in lineage if event.kind == "grow")
        assert model.config.hidden_size == list(lineage)[-1].metrics["hidden_size_after"]
        assert calls


def test_growth_sets_optimizer_stale():
    torch.manual_seed(0)
    model = SomiModel(SomiConfig.from_scratch())
    organizer = SelfOrganizer(OrganizerPolicy(compress=None, patience=5))
    batch = torch.randint(0, 256, (2, 9))
    stats = model.learn_step(batch, None)
    rng = np.random.default_rng(0)
    events = []
    for step in range(60):
        stats.jepa_error = 0.9 + 0.01 * float(rng.standard_normal()) + (0.1 if step >= 30 else 0.0)
        events += organizer.after_step(model, stats, step, batch)
        if events:
            break
    assert [event["kind"] for event in events] == ["grow"]
    assert organizer.optimizer_stale
    assert model.config.hidden_size == 24
