"""Starting Ray: an embedded loopback-only local cluster by default, or an existing cluster.

Ray 2.60 on one machine takes the machine's external address as the node IP and listens on
all interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before it starts; with it,
the node IP is 127.0.0.1 and every Ray listener binds to loopback. Serve replicas open an
internal gRPC server on [::] regardless, so a worker set-up hook rewrites wildcard gRPC
addresses to 127.0.0.1 before anything binds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1, listeners on loopback only
    "RAY_AUTH_MODE": "disabled",  # one local cluster, reachable from this machine only
    "RAY_USAGE_STATS_ENABLED": "0",
}
WILDCARD_PREFIXES = ("[::]:", "0.0.0.0:", "[::0]:")


def loopback_grpc_hook() -> None:
    """Worker set-up hook: make gRPC servers created in this process bind to 127.0.0.1."""
    import grpc._server
    import grpc.aio._server

    for cls in (grpc._server._Server, grpc.aio._server.Server):
        original = cls.add_insecure_port
        if getattr(original, "_somi_loopback", False):
            continue

        def add_insecure_port(self, address, _original=original):
            for prefix in WILDCARD_PREFIXES:
                if isinstance(address, str) and address.startswith(prefix):
                    address = f"{LOOPBACK}:{address[len(prefix):]}"
            return _original(self, address)

        add_insecure_port._somi_loopback = True
        cls.add_insecure_port = add_insecure_port


@dataclass
class RayOptions:
    """How to reach or start Ray."""

    address: str | None = None  # existing cluster ("auto", "ray://...", "host:port"); None starts a local one
    num_cpus: float | None = None  # CPUs of the embedded cluster (default: this machine's)
    num_gpus: int | None = None
    object_store_mb: int = 512  # object store of the embedded cluster
    temp_dir: str | None = None  # Ray's session folder; default under the system temp folder
    resources: dict | None = None  # extra custom resources of the embedded node


def default_temp_dir() -> str:
    # Unix socket paths are limited to 107 bytes, so the folder name stays short.
    return str(Path(tempfile.gettempdir()) / f"somi-ray-{os.getuid()}")


def start_ray(options: RayOptions | None = None):
    """Connect to Ray; start an embedded loopback-only cluster when no address is given.

    Returns the `ray` module. Calling it again when Ray is already initialised reuses the
    running connection.
    """
    options = options or RayOptions()
    if not options.address:
        # Ray reads these when it is imported and when it starts, so they are set first.
        for key, value in LOOPBACK_ENVIRONMENT.items():
            os.environ[key] = value
    import ray

    if ray.is_initialized():
        return ray

    hook = "actors.runtime.loopback_grpc_hook"
    if options.address:
        logger.info("joining Ray cluster at %s", options.address)
        ray.init(address=options.address, runtime_env={"worker_process_setup_hook": hook},
                 logging_level=logging.WARNING, log_to_driver=True)
        return ray

    temp_dir = options.temp_dir or default_temp_dir()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", temp_dir)
    loopback_grpc_hook()
    logger.info("starting embedded Ray on %s (temp folder %s)", LOOPBACK, temp_dir)
    ray.init(
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        resources=options.resources,
        include_dashboard=False,
        object_store_memory=options.object_store_mb * 1024 * 1024,
        _temp_dir=temp_dir,
        runtime_env={"worker_process_setup_hook": hook},
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )
    return ray


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_has_gpu() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) >= 1.0
