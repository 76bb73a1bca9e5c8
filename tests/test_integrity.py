"""Integrity checks, Wilson loops and fingerprints."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from somi_ray.config import SomiConfig
from somi_ray.grow import add_part
from somi_ray.integrity import WilsonDrift, check_model, compare, fingerprint, register_cli, wilson_loops
from somi_ray.lineage import Lineage, save_checkpoint
from somi_ray.model import SomiModel


def make_model(hidden: int = 16, parts: int = 2) -> SomiModel:
    torch.manual_seed(0)
    return SomiModel(SomiConfig.auto(hidden, parts), seed=0)


def random_batch(batch: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length + 1), generator=torch.Generator().manual_seed(seed))


def test_fresh_model_is_healthy():
    report = check_model(make_model())
    assert report.healthy, report.summary()
    assert report.finite and report.spectrum_ok and report.energy_ok and report.causal
    assert all(not failures for failures in report.w_constraints.values())


def test_grown_model_is_healthy():
    model = make_model()
    add_part(model, 0, torch.Generator().manual_seed(0))
    report = check_model(model)
    assert report.healthy, report.summary()
    assert len(report.wilson) == len(model.config.routes)


def test_damaged_w_is_reported():
    model = make_model()
    with torch.no_grad():
        model.parts[1].W[0, 1] = -1.0
    report = check_model(model)
    assert not report.healthy
    assert any("negative" in failure for failure in report.w_constraints[1])


def test_non_finite_tensor_is_reported():
    model = make_model()
    with torch.no_grad():
        model.decoder.weight[0, 0] = float("nan")
    report = check_model(model)
    assert not report.finite
    assert not report.healthy


def test_wilson_loop_of_one_part_route_is_its_response():
    model = make_model(16, 1)
    (loop,) = wilson_loops(model)
    assert loop.route == [0]
    assert loop.finite
    assert len(loop.top_eigenvalues) == 4
    assert 0.0 < loop.trace <= 1.0 + 1e-6  # a damped, contractive response with gain in [0, 1]


def test_drift_tolerance_passes_learning_and_fails_damage():
    model = make_model()
    optimizer = model.make_optimizer()
    drift = WilsonDrift()
    for step in range(12):
        model.learn_step(random_batch(seed=step), optimizer)
        drift.record(wilson_loops(model))
    tolerances = drift.tolerances()
    assert set(tolerances) == {0}

    before = check_model(model)
    model.learn_step(random_batch(seed=100), optimizer)
    after_learning = check_model(model)
    assert compare(before, after_learning, tolerances).ok

    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged.tracts["s0_p1"].up.add_(torch.randn_like(damaged.tracts["s0_p1"].up) * 3.0)
    result = compare(after_learning, check_model(damaged), tolerances)
    assert result.exceeded == [0], f"changes {result.changes}, tolerances {result.tolerances}"


def test_drift_round_trips_through_dict():
    drift = WilsonDrift()
    drift.record(wilson_loops(make_model()))
    restored = WilsonDrift.from_dict(json.loads(json.dumps(drift.to_dict())))
    assert restored.last == drift.last


def test_fingerprint_fields():
    model = make_model()
    probes = {"random": random_batch(), "other": random_batch(seed=1)}
    print_ = fingerprint(model, probes, {"random": 8.0})
    assert set(print_["stress"]) == {"random", "other"}
    assert set(print_["stress"]["random"]) == {0, 1}
    assert len(print_["stress"]["random"][0]["per_feature"]) == 16
    spectrum = print_["spectra"][0]
    assert 0.0 <= spectrum["min"] and spectrum["max"] <= 2.0
    assert spectrum["spectral_gap"] >= 0.0 and 1.0 <= spectrum["effective_rank"] <= 16.0
    assert len(print_["wilson"]) == 1
    assert print_["probe_bpb"] == {"random": 8.0}


def test_stress_profile_rejects_single_sequence():
    with pytest.raises(ValueError, match="at least 2 sequences"):
        fingerprint(make_model(), {"one": random_batch(batch=1)})


def test_check_command_exit_codes(tmp_path, capsys):
    model = make_model()
    lineage = Lineage()
    lineage.append("init")
    save_checkpoint(tmp_path / "good", model, "{}", lineage)
    with torch.no_grad():
        model.parts[0].W[0, 0] = 5.0
    save_checkpoint(tmp_path / "bad", model, "{}", lineage)

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    good = parser.parse_args(["check", str(tmp_path / "good"), "--json", str(tmp_path / "good.json")])
    assert good.func(good) == 0
    assert json.loads((tmp_path / "good.json").read_text())["healthy"] is True
    bad = parser.parse_args(["check", str(tmp_path / "bad")])
    assert bad.func(bad) == 1
    assert "ISSUE" in capsys.readouterr().out
