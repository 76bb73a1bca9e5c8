"""Function-preserving growth and the AutoGrow triggers on synthetic and real stress."""

import numpy as np
import pytest
import torch

from somi_ray.config import SomiConfig
from somi_ray.grow import (
    AutoGrow,
    GrowthPolicy,
    StressTracker,
    add_part,
    add_system,
    grow_hidden,
)
from somi_ray.model import SomiModel
from somi_ray.organize import OrganizerPolicy, SelfOrganizer
from tests.model_fixtures import shakespeare_byte_batches, trained_model

PATIENCE = 20


def eval_logits(model: SomiModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("operation", ["hidden", "part", "system", "all"])
def test_growth_keeps_logits(operation):
    model = trained_model().eval()
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    before = eval_logits(model, ids)

    if operation in ("hidden", "all"):
        grow_hidden(model, 24)
    if operation in ("part", "all"):
        add_part(model)
    if operation in ("system", "all"):
        add_system(model)
    if operation == "all":
        grow_hidden(model, 40)

    after = eval_logits(model, ids)
    assert (after - before).abs().max().item() < 1e-5


def test_grown_model_keeps_learning():
    model = trained_model().eval()
    grow_hidden(model, 24)
    add_part(model)
    optimizer = model.make_optimizer()
    stats = model.learn_step(torch.randint(0, 256, (4, 17)), optimizer)
    assert np.isfinite(stats.loss)
    assert model.config.hidden_size == 24
    assert model.config.n_parts == 2


def test_new_features_get_gradients():
    model = trained_model()
    grow_hidden(model, 24)
    batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    logits = model(batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    assert model.embedding.weight.grad[:, 16:].abs().max() > 0  # no saddle at zero
    assert model.decoder.weight.grad[:, 16:].abs().max() == 0  # their fields are zero until the embedding moves


def test_growth_keeps_forward_constants():
    model = trained_model(steps=0).eval()
    tau = model.config.field_tau
    grow_hidden(model, 64)
    assert model.config.field_tau == tau
    assert model.config.tract_rank == 8  # learning constants follow the new size
    assert model.config.n_modes == 4  # the mode count stays, because it is part of the function


# ------------------------------------------------------------------ synthetic stress sequences


def run_sequence(values, policy: GrowthPolicy | None = None) -> list[tuple[int, str]]:
    """Feed a stress sequence to AutoGrow on a real model; return (step, kind) of every growth."""
    model = SomiModel(SomiConfig.from_scratch())
    tracker = StressTracker(PATIENCE)
    grower = AutoGrow(policy or GrowthPolicy())
    growths = []
    for step, value in enumerate(values):
        tracker.push(float(value))
        decision = grower.decide(model, tracker, step)
        if decision is not None:
            grower.apply(model, decision, tracker, step)
            growths.append((step, decision.kind))
    return growths


def noise(n: int, level: float, seed: int, sd: float = 0.01) -> np.ndarray:
    return level + sd * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("seed", range(3))
def test_noise_at_stable_level_never_grows(seed):
    assert run_sequence(noise(2000, 0.9, seed)) == []


def test_sustained_rise_grows():
    values = np.concatenate([noise(300, 0.9, 0), noise(200, 0.95, 1)])
    growths = run_sequence(values)
    assert len(growths) == 1
    step, kind = growths[0]
    assert kind == "hidden"
    assert 300 < step <= 300 + 2 * PATIENCE


def test_short_spike_does_not_grow():
    values = noise(1000, 0.9, 2)
    values[500:505] += 0.05  # five steps of +5 sd move a 20-step window mean by 1.25 sd
    assert run_sequence(values) == []


def test_plateau_after_learning_grows():
    ramp = np.linspace(1.2, 0.9, 200) + 0.01 * np.random.default_rng(3).standard_normal(200)
    values = np.concatenate([ramp, noise(200, 0.9, 4)])
    growths = run_sequence(values)
    assert [kind for _, kind in growths] == ["hidden"]
    assert growths[0][0] >= 200


def test_cooldown_spaces_growths():
    # A new rise of 5 sd every 100 steps; the cooldown allows one growth per 250 steps.
    levels = np.repeat(0.9 + 0.05 * np.arange(12), 100)
    values = levels + 0.01 * np.random.default_rng(5).standard_normal(len(levels))
    growths = run_sequence(values, GrowthPolicy(cooldown=250))
    steps = [step for step, _ in growths]
    assert len(steps) >= 2
    assert all(later - earlier >= 250 for earlier, later in zip(steps, steps[1:]))


def test_growth_that_does_not_pay_escalates_then_stops():
    # Rises that growth never lowers: hidden features, then a Part, then nothing more at
    # the same level, because no kind paid and stress stopped rising.
    levels = np.concatenate([np.full(300, 0.9), np.full(300, 0.95), np.full(300, 1.0), np.full(900, 1.0)])
    values = levels + 0.01 * np.random.default_rng(6).standard_normal(len(levels))
    growths = run_sequence(values)
    assert [kind for _, kind in growths] == ["hidden", "part"]


def test_size_limit_stops_growth():
    levels = np.repeat(0.9 + 0.05 * np.arange(10), 150)
    values = levels + 0.01 * np.random.default_rng(7).standard_normal(len(levels))
    policy = GrowthPolicy(max_hidden=24, max_parts=1, max_systems=1)
    growths = run_sequence(values, policy)
    assert growths == [(growths[0][0], "hidden")]


# ------------------------------------------------------------------ real short runs


def test_real_text_run_grows_on_stress_rise():
    """Shakespeare bytes, then random bytes: stress rises on the random bytes and the model grows."""
    torch.manual_seed(0)
    model = SomiModel(SomiConfig.from_scratch())
    optimizer = model.make_optimizer()
    policy = OrganizerPolicy(grow=GrowthPolicy(max_hidden=24), compress=None, patience=10)
    organizer = SelfOrganizer(policy)
    generator = torch.Generator().manual_seed(0)
    text = shakespeare_byte_batches(4, 16, seed=0, n_bytes=400_000)
    events, stresses = [], []
    for step in range(160):
        batch = next(text) if step < 100 else torch.randint(0, 256, (4, 17), generator=generator)
        stats = model.learn_step(batch, optimizer)
        stresses.append(stats.jepa_error)
        events += organizer.after_step(model, stats, step, batch)
        if organizer.optimizer_stale:
            optimizer = model.make_optimizer()
            organizer.optimizer_stale = False

    assert np.mean(stresses[-30:]) > np.mean(stresses[70:100])  # random bytes are harder
    # Trial verdicts are "grow" events too. A growth itself has its kind as its action.
    growths = [event for event in events if event["kind"] == "grow" and event["details"]["action"] != "trial"]
    assert any(event["details"]["step"] >= 100 for event in growths)
    for event in growths:
        metrics = event["metrics"]
        assert metrics["parameters_after"] > metrics["parameters_before"]
        assert event["details"]["reason"]
