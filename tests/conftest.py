"""Shared fixtures: one embedded loopback-only Ray per test session, real assets from the cache."""

from __future__ import annotations

import os

# Ray reads these when it is imported, so they are set before any test module imports it:
# the node IP becomes 127.0.0.1 and every Ray listener binds to loopback.
from actors.runtime import LOOPBACK_ENVIRONMENT

os.environ.update(LOOPBACK_ENVIRONMENT)

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray bound to 127.0.0.1, started once per session in its own temp folder."""
    from actors.runtime import RayOptions, start_ray, stop_ray

    # A short path: Ray's Unix sockets live under it and are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="sr-", dir="/tmp")
    # Logical CPUs, not cores: tests run a ModelActor, TeacherActors, a sampler and Serve
    # replicas side by side, and most of them wait on each other.
    ray = start_ray(RayOptions(num_cpus=8, temp_dir=temp_dir, object_store_mb=256))
    yield ray
    stop_ray()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _asset(getter, *args) -> Path:
    """A fetched asset, or a clear failure in CI (where scripts/setup.sh fetches them) and a skip elsewhere."""
    try:
        return getter(*args)
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            pytest.fail(f"asset missing in CI: {error}")
        pytest.skip(f"asset not fetched: {error}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from somi_ray.assets import teacher_path

    return _asset(teacher_path, "smollm2")


@pytest.fixture(scope="session")
def shakespeare_paths() -> dict[str, Path]:
    from somi_ray.assets import corpus_path

    return {split: _asset(corpus_path, "shakespeare", split) for split in ("train", "heldout")}


def ray_listeners_of(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listener owned by one of `pids`."""
    import psutil

    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, conn.pid))
    return found


def session_process_ids() -> set[int]:
    """This process and everything it started (Ray's GCS, raylet, workers)."""
    import psutil

    me = psutil.Process()
    return {me.pid, *(child.pid for child in me.children(recursive=True))}
