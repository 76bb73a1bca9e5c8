"""Absorption never damages the model: rollback on a destructive teacher, survival of actor deaths."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.absorber import AbsorbJob, run_absorb_job
from actors.model_actor import ModelActor
from somi_ray.lineage import load_lineage
from tests.conftest import session_process_ids
from tests.teacher_fixtures import byte_level_tokenizer, copy_teacher


def _scale_teacher(folder: str, factor: float) -> None:
    """Multiply every weight of a saved fixture by `factor` (finite, but far from any trained scale)."""
    from safetensors.numpy import load_file, save_file

    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            tensors = {k: (v.astype(np.float32) * factor) for k, v in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})


def test_destructive_teacher_is_rolled_back(tmp_path, shakespeare_paths):
    from somi_ray.teachers import build_package

    tokenizer = byte_level_tokenizer()
    actor = ModelActor(str(tmp_path / "somi"))
    actor.initialize(tokenizer.to_str(), 16, 2, seed=0)
    text = shakespeare_paths["train"].read_text(encoding="utf-8")[:40_000]
    chunks = [text[i:i + 400] for i in range(0, len(text), 400)]
    for start in range(0, 80, 8):
        actor.learn_texts(chunks[start:start + 8], window=48)
    probes = {"shakespeare": shakespeare_paths["heldout"].read_text(encoding="utf-8")[:4000]}

    teacher = copy_teacher("qwen2", str(tmp_path))  # byte-level tokenizer, random weights
    _scale_teacher(teacher, 1e3)
    package = build_package(teacher, tokenizer, 16, 2, somi_embedding=actor.embedding())
    state_before = {k: v.clone() for k, v in actor.model.state_dict().items()}
    rows_before = actor.lineage_rows()

    actor.begin_absorb(package, 0.5, probes, {"attempt": "destructive"})
    for band in package.bands:
        actor.absorb_band(band)
    result = actor.finish_absorb({"bpb_tolerance": 0.02, "interference_tolerance": 0.02})

    assert not result["committed"]
    assert result["reasons"], "a rollback must say why"
    state_after = actor.model.state_dict()
    for name, tensor in state_before.items():
        assert torch.equal(tensor, state_after[name]) or (
            torch.isnan(tensor).all() and torch.isnan(state_after[name]).all()), f"{name} changed"
    rows_after = actor.lineage_rows()
    assert rows_after[:len(rows_before)] == rows_before
    assert [row["kind"] for row in rows_after[len(rows_before):]] == ["absorb-attempt", "rollback"]
    assert rows_after[-1]["version"] == rows_before[-1]["version"]

    reloaded = ModelActor(str(tmp_path / "somi"))
    assert reloaded.lineage_rows() == rows_after
    for name, tensor in state_before.items():
        assert torch.equal(tensor, reloaded.model.state_dict()[name]) or torch.isnan(tensor).all(), name


def _actor_processes(kind: str) -> list:
    import psutil

    found = []
    for pid in session_process_ids():
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if f"ray::{kind}" in title:
            found.append(pid)
    return found


def _job(smollm2_path, shakespeare_paths, tmp_path, **overrides) -> AbsorbJob:
    train = tmp_path / "train.txt"
    train.write_text(shakespeare_paths["train"].read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    held = tmp_path / "held.txt"
    held.write_text(shakespeare_paths["heldout"].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    options = dict(teachers=[str(smollm2_path)], corpus=str(train), eval_texts={"shakespeare": str(held)},
                   out=str(tmp_path / "somi"), steps=2, batch_size=2, seq_len=32, hidden_size=16, n_parts=2,
                   eval_bytes=2000, score_teachers=False, commit_every=1)
    options.update(overrides)
    return AbsorbJob(**options)


def _run_in_thread(job):
    outcome = {}

    def target():
        try:
            outcome["report"] = run_absorb_job(job)
        except BaseException as error:  # reported by the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_job_survives_teacher_actor_death(ray_session, smollm2_path, shakespeare_paths, tmp_path):
    thread, outcome = _run_in_thread(_job(smollm2_path, shakespeare_paths, tmp_path))
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and thread.is_alive():
        pids = _actor_processes("TeacherActor")
        if pids:
            time.sleep(1.0)  # let extraction start
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "no TeacherActor process was found to kill"
    assert "error" not in outcome, f"job failed after the teacher died: {outcome.get('error')}"
    names = [row["name"] for row in outcome["report"].rows]
    assert any(name.startswith("SOMI after absorbing") for name in names)


@pytest.mark.slow
def test_model_actor_death_loses_no_event(ray_session, smollm2_path, shakespeare_paths, tmp_path):
    job = _job(smollm2_path, shakespeare_paths, tmp_path)
    thread, outcome = _run_in_thread(job)
    out = Path(job.out)
    killed = None
    deadline = time.time() + 180
    while killed is None and time.time() < deadline and thread.is_alive():
        try:
            kinds = [event.kind for event in load_lineage(out)]
        except Exception:  # the checkpoint does not exist yet
            kinds = []
        if "absorb-attempt" in kinds:
            pids = _actor_processes("ModelActor")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "the ModelActor was not seen during absorption"
    assert "error" not in outcome, f"job failed after the ModelActor died: {outcome.get('error')}"

    events = list(load_lineage(out))
    assert [event.event_id for event in events] == list(range(len(events)))
    versions = [event.version for event in events]
    assert versions == sorted(versions)
    absorbs = [event for event in events if event.kind == "absorb"]
    assert len(absorbs) == 1, f"expected one absorb event, got {[e.kind for e in events]}"
    attempts = [event.details["attempt"] for event in events if event.kind == "absorb-attempt"]
    assert len(attempts) >= 2, "the attempt interrupted by the death must be followed by a new one"
    assert absorbs[0].details["attempt"] == attempts[-1]
    learns = [event for event in events if event.kind == "learn"]
    assert sum(json.loads(json.dumps(e.details))["steps"] for e in learns) >= job.steps
