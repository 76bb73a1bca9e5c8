"""somi-ray on a Ray cluster: `ray job submit` to a local head node, and where actors land."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from actors.runtime import LOOPBACK_ENVIRONMENT

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _loopback_env() -> dict:
    env = dict(os.environ, **LOOPBACK_ENVIRONMENT)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def head_node():
    """A Ray head node on 127.0.0.1 started with `ray start --head --block`; yields the job API URL."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    dashboard = _free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--port=0", "--num-cpus=4",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(command, env=_loopback_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", url],
                                   env=_loopback_env(), capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}: {(Path(temp) / 'head.log').read_text()}")
            time.sleep(2)
        else:
            pytest.fail("the head node's job API did not come up within 90 s")
        yield url
    finally:
        # The head runs in its own process group: stop it, then make sure nothing is left.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.mark.slow
def test_ray_job_submit_runs_absorb(head_node, smollm2_path, shakespeare_paths, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text(shakespeare_paths["train"].read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    held = tmp_path / "held.txt"
    held.write_text(shakespeare_paths["heldout"].read_text(encoding="utf-8")[:2000], encoding="utf-8")
    out = tmp_path / "somi"
    entrypoint = [
        str(VENV_BIN / "somi-ray"), "absorb", "--address", "auto", "--teacher", str(smollm2_path),
        "--corpus", str(train), "--probe", f"shakespeare={held}", "--out", str(out), "--steps", "2",
        "--batch-size", "2", "--seq-len", "32", "--hidden", "16", "--parts", "2", "--eval-bytes", "1500",
        "--no-teacher-scores", "--commit-every", "1", "--json", str(tmp_path / "report.json"),
    ]
    result = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", head_node, "--", *entrypoint],
                            env=_loopback_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(row["name"].startswith("SOMI after absorbing") for row in report["rows"])
    assert (out / "model.safetensors").is_file()


PLACEMENT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from actors.runtime import LOOPBACK_ENVIRONMENT
    os.environ.update(LOOPBACK_ENVIRONMENT)
    import ray
    from ray.cluster_utils import Cluster
    from actors.model_actor import remote_model_actor
    from actors.teacher_actor import remote_teacher_actor

    os.makedirs(os.path.join(sys.argv[2], "ray"), exist_ok=True)  # Ray writes its address file there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": sys.argv[2]})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    def node_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

    model = remote_model_actor(sys.argv[1])
    teachers = [remote_teacher_actor(f"/nonexistent/teacher-{i}.gguf") for i in range(3)]
    result = {
        "gpu_node": gpu_node.node_id,
        "model_node": node_of(model),
        "teacher_nodes": [node_of(t) for t in teachers],
        "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
    }
    print("RESULT " + json.dumps(result))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_actors_land_on_the_right_nodes(tmp_path):
    temp = tempfile.mkdtemp(prefix="cl", dir="/tmp")
    try:
        result = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT, str(tmp_path / "somi"), temp],
                                env=dict(_loopback_env(), RAY_TMPDIR=temp), capture_output=True, text=True, timeout=300,
                                cwd=str(Path(__file__).resolve().parents[1]))
    finally:
        subprocess.run(["rm", "-rf", temp], check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    placement = json.loads(lines[-1][len("RESULT "):])
    assert len(placement["nodes"]) == 4
    assert placement["model_node"] == placement["gpu_node"], "the ModelActor must use the GPU node"
    assert len(set(placement["teacher_nodes"])) >= 2, f"teachers were not spread: {placement['teacher_nodes']}"
