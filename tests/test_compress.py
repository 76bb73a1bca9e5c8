"""Compression operations, calibration, the rollback guard and the AutoCompress trigger."""

import math

import numpy as np
import pytest
import torch

from somi_ray.compress import (
    AutoCompress,
    CompressionPlan,
    CompressionPolicy,
    compress,
    dark_matter_scores,
    plan_compression,
    quantize_connectivity,
    removal_cost,
    decoder_inputs,
    redundant_features,
    shrink_hidden,
)
from somi_ray.grow import StressTracker, grow_hidden
from somi_ray.lineage import Lineage, load_checkpoint, save_checkpoint
from somi_ray.model import SomiModel
from somi_ray.physics.laplacian import int8_grid
from tests.model_fixtures import trained_model


def batch(seed: int = 1, size: int = 8, width: int = 33) -> torch.Tensor:
    return torch.randint(0, 256, (size, width), generator=torch.Generator().manual_seed(seed))


def state_copy(model: SomiModel) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_shrink_removes_features_everywhere():
    model = trained_model(hidden=24)
    keep = list(range(0, 24, 2)) + [1, 3, 5, 7]
    shrink_hidden(model, keep)
    H = len(keep)
    assert model.config.hidden_size == H
    assert model.embedding.weight.shape == (256, H)
    assert model.decoder.weight.shape == (256, H)
    assert model.parts[0].W.shape == (H, H)
    assert model.config.norm_width == 16.0  # fixed at creation
    assert torch.isfinite(model.eval()(batch()[:, :-1])).all()
    optimizer = model.make_optimizer()
    assert np.isfinite(model.learn_step(batch(), optimizer).loss)


def test_removing_grown_features_restores_logits():
    """Features added by growth are silent, so removing them gives back the original function."""
    model = trained_model(hidden=16)
    ids = batch()[:, :-1]
    with torch.no_grad():
        before = model.eval()(ids)
    grow_hidden(model, 24)
    shrink_hidden(model, list(range(16)))
    with torch.no_grad():
        after = model.eval()(ids)
    assert (after - before).abs().max().item() < 1e-4


def test_dark_matter_scores_find_planted_feature():
    model = trained_model(hidden=24)
    feature = 5
    with torch.no_grad():
        for part in model.parts:
            part.mass[feature] = model.config.mass_max
            part.W[feature, :] *= 1e-3
            part.W[:, feature] *= 1e-3
        model.decoder.weight[:, feature] *= 1e-3
    scores = dark_matter_scores(model)
    assert int(torch.argmax(scores)) == feature


def test_redundant_features_find_copy():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(500, 6, generator=generator)
    hidden[:, 4] = 0.7 * hidden[:, 1] - 0.2 * hidden[:, 2] + 1e-3 * torch.randn(500, generator=generator)
    chosen = redundant_features(hidden, r2_threshold=0.98, limit=3)
    assert len(chosen) == 1
    assert chosen[0] in (1, 2, 4)


def test_int8_grid_keeps_the_constraints():
    W = torch.rand(32, 32) * (torch.rand(32, 32) < 0.3)
    W = W + W.T
    W.fill_diagonal_(0.0)
    q, scale = int8_grid(W)
    assert q.dtype == torch.int8
    assert torch.equal(q, q.T)
    assert int(q.min()) >= 0
    assert bool((q[W == 0] == 0).all())  # the diagonal and the missing edges stay empty
    error = (q.float() * scale - W).abs().max() / W.max()
    assert error <= 0.5 / 127 + 1e-6


def quantized_model() -> SomiModel:
    model = trained_model(hidden=24)
    error = quantize_connectivity(model)
    assert 0.0 < error < 0.01
    return model


def test_int8_weights_are_stored_as_int8(tmp_path):
    from safetensors import safe_open

    model = quantized_model().eval()
    ids = batch()[:, :-1]
    with torch.no_grad():
        before = model(ids)
    save_checkpoint(tmp_path / "ckpt", model, "{}", Lineage())
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as stored:
        assert stored.get_tensor("parts.0.W").dtype == torch.int8
        assert stored.get_tensor("parts.0.w_scale").item() > 0

    loaded = load_checkpoint(tmp_path / "ckpt").model.eval()
    assert torch.equal(loaded.parts[0].W, model.parts[0].W)
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)


def test_local_learning_keeps_w_on_its_grid():
    model = quantized_model()
    W_before = model.parts[0].W.clone()
    optimizer = model.make_optimizer()
    for seed in range(3):
        model.learn_step(batch(seed), optimizer)
    part = model.parts[0]
    steps = part.W / part.w_scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert not torch.equal(part.W, W_before)  # the rule still moves W, in whole grid steps


def test_float_checkpoint_loads_without_grid():
    model = trained_model(hidden=24)
    state = model.state_dict()
    state.pop("parts.0.w_scale")  # written before W could be int8
    fresh = trained_model(hidden=24, seed=3)
    fresh.load_state_dict(state)
    assert float(fresh.parts[0].w_scale) == 0.0
    assert torch.equal(fresh.parts[0].W, model.parts[0].W)


def test_int8_weights_without_step_are_rejected():
    fresh = trained_model(hidden=24, seed=3)
    damaged = quantized_model().checkpoint_state()
    damaged["parts.0.w_scale"] = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"parts\.0\.W is stored as int8 but its grid step w_scale"):
        fresh.load_state_dict(damaged)


def test_compression_within_tolerance_is_kept():
    model = trained_model(hidden=24)
    plan = CompressionPlan(remove=list(range(16, 24)), prune_edges=False)  # the silent grown features
    policy = CompressionPolicy(calibration_steps=5)
    result = compress(model, plan, batch(), policy)
    assert result.accepted, result.reason
    assert model.config.hidden_size == 16
    assert result.metrics["after"]["parameters"] < result.metrics["before"]["parameters"]


def test_compression_beyond_tolerance_rolls_back():
    model = trained_model(hidden=24)
    before = state_copy(model)
    config_before = model.config.to_dict()
    plan = CompressionPlan(remove=list(range(0, 8)), prune_edges=True, int8_weights=True)
    policy = CompressionPolicy(calibration_steps=2, bpb_tolerance=0.0)

    scores = iter([1.0, 1.5])  # held-out bits per byte before and after: a 50 % rise
    result = compress(model, plan, batch(), policy, eval_fn=lambda m: next(scores))

    assert not result.accepted
    assert "rolled back" in result.reason
    assert model.config.to_dict() == config_before
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_calibration_lowers_kl():
    model = trained_model(hidden=24)
    plan = CompressionPlan(remove=list(range(0, 6)), prune_edges=False)
    result = compress(model, plan, batch(), CompressionPolicy(calibration_steps=20, bpb_tolerance=10.0,
                                                              drift_tolerance=10.0))
    assert result.metrics["calibration_kl_after"] < result.metrics["calibration_kl_before"]


def test_plan_respects_min_hidden():
    model = trained_model(hidden=24)
    plan = plan_compression(model, batch()[:, :-1], CompressionPolicy(min_hidden=22, dark_sigmas=-10.0,
                                                                      redundancy_r2=0.0))
    assert len(plan.remove) <= 2


def test_auto_compress_waits_for_sustained_low_stress():
    model = trained_model(hidden=24)
    tracker = StressTracker(20)
    # Every feature counts as redundant. The settled-structure trigger is out of reach here.
    compressor = AutoCompress(CompressionPolicy(redundancy_r2=0.0, removal_kl=math.inf, calm_windows=1000))
    rng = np.random.default_rng(0)
    plans = []
    values = np.concatenate([0.9 + 0.01 * rng.standard_normal(200), 0.8 + 0.01 * rng.standard_normal(60)])
    for step, value in enumerate(values):
        tracker.push(float(value))
        plan = compressor.decide(model, tracker, step, batch())
        if plan is not None:
            plans.append(step)
            break
    assert plans
    assert plans[0] >= 200


def settled_trigger_step(policy: CompressionPolicy, values: np.ndarray, patience: int = 20) -> int | None:
    """Return the first step at which AutoCompress returns a plan for the stress sequence, or None."""
    model = trained_model(hidden=24)
    tracker = StressTracker(patience)
    compressor = AutoCompress(policy)
    for step, value in enumerate(values):
        tracker.push(float(value))
        plan = compressor.decide(model, tracker, step, batch())
        if plan is not None:
            assert plan.remove
            assert "settled" in plan.trigger
            return step
    return None


def test_auto_compress_settled_with_redundancy():
    rng = np.random.default_rng(1)
    values = 0.9 + 0.01 * rng.standard_normal(300)
    step = settled_trigger_step(CompressionPolicy(redundancy_r2=0.0, removal_kl=math.inf, calm_windows=6), values)
    assert step is not None
    assert step + 1 >= 6 * 20  # steps count from 0


def test_auto_compress_settled_needs_features():
    rng = np.random.default_rng(1)
    values = 0.9 + 0.01 * rng.standard_normal(300)
    nothing = CompressionPolicy(redundancy_r2=1.0, dark_sigmas=math.inf, low_saliency=False, calm_windows=6)
    assert settled_trigger_step(nothing, values) is None


def test_auto_compress_not_while_stress_rises():
    rng = np.random.default_rng(1)
    values = np.linspace(0.9, 1.2, 300) + 0.01 * rng.standard_normal(300)
    policy = CompressionPolicy(redundancy_r2=0.0, removal_kl=math.inf, calm_windows=6)
    assert settled_trigger_step(policy, values) is None


def test_compression_moving_wilson_loops_rolls_back():
    model = trained_model(hidden=24)
    before = state_copy(model)
    plan = CompressionPlan(remove=list(range(0, 6)), prune_edges=True)
    policy = CompressionPolicy(calibration_steps=2, bpb_tolerance=10.0, drift_tolerance=10.0)

    result = compress(model, plan, batch(), policy, wilson_tolerances={0: 1e-9})

    assert not result.accepted
    assert "Wilson" in result.reason
    assert result.metrics["wilson_changes"][0] > 1e-9
    for name, tensor in before.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_compression_within_wilson_tolerance_is_kept():
    model = trained_model(hidden=24)
    plan = CompressionPlan(remove=list(range(0, 6)), prune_edges=True)
    policy = CompressionPolicy(calibration_steps=2, bpb_tolerance=10.0, drift_tolerance=10.0)

    result = compress(model, plan, batch(), policy, wilson_tolerances={0: 10.0})

    assert result.accepted, result.reason
    assert model.config.hidden_size == 18


def test_plan_keeps_only_affordable_features():
    model = trained_model(hidden=24)
    inputs = batch()[:, :-1]
    everything = plan_compression(model, inputs, CompressionPolicy(redundancy_r2=0.0, removal_kl=math.inf))
    assert everything.remove
    strict = plan_compression(model, inputs, CompressionPolicy(redundancy_r2=0.0, removal_kl=1e-3))
    assert set(strict.remove) <= set(everything.remove) | {f for f, r in strict.reasons.items() if r == "low-saliency"}
    for feature in strict.remove:
        assert strict.removal_kl[feature] <= 1e-3
    logits, hidden = decoder_inputs(model, inputs)
    costs = [removal_cost(model, inputs, feature, hidden, logits) for feature in range(24)]
    assert len(strict.remove) <= sum(1 for kl in costs if kl <= 1e-3)


def test_compression_raising_stress_rolls_back():
    model = trained_model(hidden=24)
    before = state_copy(model)
    plan = CompressionPlan(remove=list(range(0, 6)), prune_edges=True)
    policy = CompressionPolicy(calibration_steps=2, bpb_tolerance=10.0, drift_tolerance=10.0)

    # A negative tolerance fails any compression that does not lower stress by more than 1.
    result = compress(model, plan, batch(), policy, stress_tolerance=-1.0)

    assert not result.accepted
    assert "stress rose" in result.reason
    assert result.metrics["stress_after"] - result.metrics["stress_before"] > -1.0
    for name, tensor in before.items():
        assert torch.equal(model.state_dict()[name], tensor), name
