"""SelfOrganizer: events, optimizer flag and switches, on a real short Shakespeare run."""

import json
from dataclasses import replace

import numpy as np
import pytest
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


def run_growth_trial(min_gain: float, max_parts: int = 1, steps: int = 60):
    """Run real Shakespeare steps with a stress level that rises at step 30, so one growth happens.

    Returns the model, the events and the model's state at the growth."""
    torch.manual_seed(0)
    model = SomiModel(SomiConfig.from_scratch())
    optimizer = model.make_optimizer()
    policy = OrganizerPolicy(grow=GrowthPolicy(max_hidden=24, max_parts=max_parts, max_systems=max_parts,
                                               trial_windows=2, min_gain=min_gain),
                             compress=None, patience=5)
    organizer = SelfOrganizer(policy)
    batches = shakespeare_byte_batches(4, 16, seed=0, n_bytes=200_000)
    rng = np.random.default_rng(0)
    events, at_growth = [], None
    for step in range(steps):
        batch = next(batches)
        stats = model.learn_step(batch, optimizer)
        level = 0.9 + 0.01 * float(rng.standard_normal()) + (0.1 if step >= 30 else 0.0)
        new = organizer.after_step(model, replace(stats, jepa_error=level), step, batch)
        if any(event["details"]["action"] == "hidden" for event in new):
            at_growth = {name: value.clone() for name, value in model.state_dict().items()}
        events += new
        if organizer.optimizer_stale:
            optimizer = model.make_optimizer()
            organizer.optimizer_stale = False
    return model, events, at_growth


@pytest.mark.parametrize("min_gain", [1.0, -1.0])
def test_growth_trial_keeps_or_undoes(min_gain):
    model, events, at_growth = run_growth_trial(min_gain)
    actions = [event["details"]["action"] for event in events]
    assert actions == ["hidden", "trial"]  # nothing else is decided while a growth is on trial
    growth, verdict = events
    assert verdict["details"]["step"] - growth["details"]["step"] == 2 * 5
    assert "training loss" in verdict["details"]["reason"]
    if min_gain > 0:  # no growth can gain 100 %, so the ungrown copy replaces the model
        assert verdict["details"]["accepted"] is False
        assert verdict["metrics"]["rolled_back"] is True
        assert model.config.hidden_size == 16
        assert verdict["metrics"]["parameters_after"] == growth["metrics"]["parameters_before"]
        # The copy learnt on the trial's batches, so nothing learnt meanwhile is lost.
        assert not torch.equal(model.embedding.weight, at_growth["embedding.weight"][:, :16])
        assert model(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)
    else:
        assert verdict["details"]["accepted"] is True
        assert verdict["metrics"]["rolled_back"] is False
        assert model.config.hidden_size == 24
        assert verdict["metrics"]["parameters_after"] == growth["metrics"]["parameters_after"]


def test_undone_growth_tries_another_kind():
    model, events, _ = run_growth_trial(1.0, max_parts=2, steps=90)
    actions = [event["details"]["action"] for event in events]
    assert actions[:4] == ["hidden", "trial", "part", "trial"]
    assert "hidden growth asked for" in events[2]["details"]["reason"]
    assert events[2]["details"]["step"] - events[1]["details"]["step"] >= 5  # the cooldown
    assert model.config.hidden_size == 16
    assert model.config.n_parts == 1  # both growths were undone


def test_lineage_plot_reads_structural_events(tmp_path):
    from somi_ray.plots import lineage_series, plot_lineage

    lineage = Lineage()
    lineage.append("init", {}, {"hidden_size": 16, "n_parts": 1, "parameters": 8636, "bpb": 8.0})
    lineage.append("grow", {"action": "part"}, {"hidden_size_before": 16, "hidden_size_after": 16,
                                                "n_parts_before": 1, "n_parts_after": 2,
                                                "parameters_before": 8636, "parameters_after": 8874,
                                                "bpb_before": 4.1, "bpb_after": 4.0})
    lineage.append("compress", {}, {"hidden_size_after": 12, "n_parts_after": 2, "parameters_after": 7000})
    series = lineage_series(lineage)
    assert series["hidden_size"] == [16, 16, 12]
    assert series["n_parts"] == [1, 2, 2]
    assert series["parameters"] == [8636, 8874, 7000]
    assert series["bpb"] == {"held-out": [(0, 8.0), (1, 4.0)]}
    path = plot_lineage(lineage, tmp_path / "lineage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_actor_commits_structural_events(ray_session, tmp_path):
    """The ModelActor's learn runs the organizer and commits each of its events to the lineage."""
    from actors.absorber import _windows
    from actors.model_actor import ModelActor
    from actors.stress_sampler import StressSampler
    from somi_ray.assets import corpus_path
    from somi_ray.data import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = corpus_path("shakespeare", "train").read_bytes()[:300_000].decode("utf-8", errors="ignore")
    sampler = ray_session.remote(StressSampler).options(num_cpus=0.25).remote(_windows(text, tokenizer, 32), seed=0)

    off = ModelActor(str(tmp_path / "off"), device="cpu", auto_grow=False, auto_compress=False)
    assert off.organizer is None

    torch.manual_seed(0)
    actor = ModelActor(str(tmp_path / "somi"), device="cpu")
    actor.initialize(tokenizer.to_str(), 16, 1)
    policy = OrganizerPolicy(grow=GrowthPolicy(max_hidden=24, trial_windows=2), compress=None, patience=5)
    actor.organizer = SelfOrganizer(policy)
    learned = actor.learn(sampler, 80, 4)

    events = list(actor.lineage)
    structural = [event for event in events if event.kind == "grow"]
    assert structural, "no growth in 80 steps with 5-step windows"
    assert json.loads(learned["metrics"])["structure_events"] == len(structural)
    assert events[-1].kind == "learn"
    # A kept verdict changes nothing and so does not raise the version; every other event does.
    for event, previous in zip(events[1:], events[:-1]):
        keeps = event.details.get("action") == "trial" and event.details["accepted"]
        assert event.version == previous.version + (0 if keeps else 1)
    info = actor.info()
    last = structural[-1].metrics
    assert info["hidden_size"] == last["hidden_size_after"]
    assert info["n_parts"] == last["n_parts_after"]
    reloaded = ModelActor(str(tmp_path / "somi"), device="cpu")
    assert reloaded.info()["version"] == info["version"]
    assert reloaded.info()["hidden_size"] == info["hidden_size"]


def test_finish_judges_growth_on_trial():
    torch.manual_seed(0)
    model = SomiModel(SomiConfig.from_scratch())
    policy = OrganizerPolicy(grow=GrowthPolicy(max_hidden=24, max_parts=1, max_systems=1, min_gain=1.0),
                             compress=None, patience=5)
    organizer = SelfOrganizer(policy)
    assert organizer.finish(model) == []  # nothing on trial
    batch = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    stats = model.learn_step(batch, None)
    rng = np.random.default_rng(0)
    for step in range(60):
        stats.jepa_error = 0.9 + 0.01 * float(rng.standard_normal()) + (0.1 if step >= 30 else 0.0)
        if organizer.after_step(model, stats, step, batch):
            break
    assert model.config.hidden_size == 24
    assert organizer.trial is not None

    events = organizer.finish(model)  # learning stops right after the growth
    assert [event["details"]["action"] for event in events] == ["trial"]
    assert events[0]["details"]["accepted"] is False
    assert events[0]["changed"] is True
    assert model.config.hidden_size == 16
    assert organizer.trial is None


@pytest.mark.parametrize("make", [
    lambda: OrganizerPolicy(patience=0),
    lambda: GrowthPolicy(rise_sigmas=-1.0),
    lambda: GrowthPolicy(min_gain=float("nan")),
    lambda: CompressionPolicy(removal_kl=-1.0),
    lambda: CompressionPolicy(low_sigmas=0.0),
])
def test_policy_values_out_of_range_are_rejected(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_learn_command_checks_options(tmp_path, capsys):
    from somi_ray.assets import corpus_path
    from somi_ray.cli import main
    from somi_ray.data import byte_tokenizer
    from somi_ray.lineage import load_checkpoint

    (tmp_path / "tok.json").write_text(byte_tokenizer().to_str())
    corpus = tmp_path / "train.txt"
    corpus.write_bytes(corpus_path("shakespeare", "train").read_bytes()[:60_000])
    assert main(["init", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok.json"), "--from-scratch"]) == 0
    for option in ("--commit-every", "--batch-size", "--seq-len"):
        status = main(["learn", str(tmp_path / "m"), "--corpus", str(corpus), "--steps", "5", option, "0"])
        assert status == 1
        assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
    assert len(load_checkpoint(tmp_path / "m").lineage) == 1  # nothing was recorded

    assert main(["learn", str(tmp_path / "m"), "--corpus", str(corpus), "--steps", "30", "--seq-len", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_systems"] == 1
    lineage = load_checkpoint(tmp_path / "m").lineage
    assert summary["version"] == lineage.version
