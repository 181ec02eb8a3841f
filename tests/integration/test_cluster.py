"""A real 2-node Ray cluster on loopback (GitHub issue 8): Serve rides out a killed replica, a sweep runs on it.

Both nodes are `ray start` processes on this machine, each with its own --temp-dir (Ray 2.60 accepts one per
node), so their sockets and logs never meet; the second node carries a `worker_node` resource. The tests
run in order: Serve with 2 replicas (one per node, 1 CPU each) under load while one replica is SIGKILLed,
then Serve is shut down to free the CPUs for a 4-trial sweep through `hydra/launcher=ray_cluster`, then the
cluster is stopped. Stopping signals only the processes whose command line names this cluster's temp dir,
never `ray stop`, which kills every Ray process on the machine, other people's clusters included.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Helpers and fixtures of the single-node Serve test and of the sweep tests (tests/ is on sys.path).
from integration.test_serving import AUTH, KEY, write_tiny_bundle
from model import conftest as model_fixtures
from model import test_sweep
from support import ROOT, free_port, new_store, stop_processes

pytestmark = pytest.mark.slow

small_project = model_fixtures.small_project
sweep_project = test_sweep.sweep_project

RAY = Path(sys.executable).parent / "ray"
REPLICA_CLASS = "ServeReplica:intentops:IntentService"
MAX_REQUESTS = 4000  # load bounds: whichever comes first
MAX_LOAD_S = 240.0
RECOVERY_TIMEOUT_S = 180.0
MAX_ERROR_RATE = 0.01


@dataclass
class Cluster:
    address: str
    temp_root: Path

    def pids(self, name: str = "") -> list[int]:
        """Live processes of this cluster (and with `name` in their command line).

        A process is this cluster's when its command line or one of its open files is under the temp dir:
        Ray renames its agents and workers (`ray::RuntimeEnvAgent`), but their stdout/stderr are log files there.
        """
        # a driver (this test) holds Ray log files too
        root, out, spare = str(self.temp_root), [], _ancestors()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in spare:
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                mine = root in cmd or any(_link(fd).startswith(root) for fd in (proc / "fd").iterdir())
            except OSError:
                continue
            if mine and name in cmd and not zombie:
                out.append(int(proc.name))
        return out

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM this cluster's processes, then SIGKILL what is left after `grace_s`."""
        stop_processes(self.pids, grace_s)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pids


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def ray_start(args: list[str], temp_dir: Path) -> None:
    env = {**os.environ, "PATH": f"{RAY.parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    # Every port a node would otherwise take from a fixed default (10001, 52365, ...) is a free one.
    cmd = [
        str(RAY),
        "start",
        *args,
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        "--log-style=record",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def without_token_auth(mp: pytest.MonkeyPatch) -> None:
    """Token auth off for this loopback cluster's nodes and its driver, explicitly (RAY_AUTH_MODE=disabled).

    Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists, but not for a joining node, so the mode
    must be said on every node. It must also match the driver's, and the driver's is fixed by the first `import
    ray` in this pytest process, which is often at collection (a module importing `intentops.api`), before any
    fixture can set it: that mode is `disabled` unless RAY_AUTH_MODE says otherwise, so every node says disabled.
    """
    mp.setenv("RAY_AUTH_MODE", "disabled")
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU) and a worker node (1 CPU, resource `worker_node`) on 127.0.0.1; stopped at the end."""
    # Short root: Ray's unix sockets live under it and AF_UNIX paths stop at 107 bytes.
    temp_root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    port = free_port()
    c = Cluster(f"127.0.0.1:{port}", temp_root)
    with pytest.MonkeyPatch.context() as mp:
        without_token_auth(mp)
        try:
            ray_start(
                [
                    "--head",
                    f"--port={port}",
                    f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=false",
                ],
                temp_root / "head",
            )
            ray_start([f"--address={c.address}", '--resources={"worker_node": 1}'], temp_root / "worker")
            yield c
        finally:
            c.stop()
            shutil.rmtree(temp_root, ignore_errors=True)


def replicas() -> dict[int, dict]:
    """ALIVE IntentService replicas of the connected cluster by pid, each with its node id (public means only).

    A replica is a worker process whose title Ray sets to `ray::ServeReplica:intentops:IntentService` (with
    `.<method>` appended while it runs a call); its parent is its node's raylet, whose `--node_id=` flag names a
    node of `ray.nodes()`. The GCS actor table is reachable only through private Ray modules or the state API, and
    the state API needs the dashboard, which this cluster runs without.
    """
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if title.split(".", 1)[0] != f"ray::{REPLICA_CLASS}":
                continue
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            raylet = (Path("/proc") / ppid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        node = next((a[len(b"--node_id=") :].decode() for a in raylet if a.startswith(b"--node_id=")), None)
        if state != "Z" and node in alive:
            out[int(proc.name)] = {"Pid": int(proc.name), "NodeID": node}
    return out


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("intentops")
    return app.deployments["IntentService"].replica_states.get("RUNNING", 0) if app else 0


def wait_for(check, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - start


def test_serve_replaces_a_killed_replica_under_load(cluster, tmp_path):
    """2 replicas, one per node, 4 clients; SIGKILL the worker node's replica: ≤1% errors, 2 RUNNING again."""
    import ray
    from ray import serve

    from intentops.api.service import IntentService
    from intentops.inference.registry import Registry

    registry = tmp_path / "registry"
    version = write_tiny_bundle(tmp_path / "v1", confident=True)
    Registry.at(registry).add(tmp_path / "v1", version)
    (registry / "production").write_text(version + "\n")
    new_store(tmp_path / "queue.db")
    user_config = {
        "bundle": "production",
        "registry": str(registry),
        "store": {"record_predictions": True, "db": str(tmp_path / "queue.db")},
        "monitoring": {"enabled": False},
    }
    port = free_port()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 60, "2 alive nodes")
        # HeadOnly: a proxy per node would bind the same 127.0.0.1 port twice on this one machine.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        service = IntentService.options(
            num_replicas=2,
            user_config=user_config,
            ray_actor_options={
                "num_cpus": 1,
                "runtime_env": {"env_vars": {"INTENTOPS_API_KEY": KEY, "INTENTOPS_ROOT": str(ROOT)}},
            },
            logging_config={"encoding": "JSON", "enable_access_log": False},
        )
        serve.run(service.bind(), name="intentops", route_prefix="/")
        before = replicas()
        worker_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"])
        assert len(before) == 2 and running_replicas() == 2
        assert len({a["NodeID"] for a in before.values()}) == 2, "replicas share a node"
        victim = next(a for a in before.values() if a["NodeID"] == worker_node)

        result = asyncio.run(load_and_kill(f"http://127.0.0.1:{port}", victim, set(before)))
        codes = result.pop("codes")
        record = {
            "test": "serve_replica_kill",
            **result,
            "status_codes": dict(codes),
            "error_rate": round(result["errors"] / result["requests"], 5),
        }
        print(json.dumps(record))
        assert result["recovered"], record
        assert record["error_rate"] <= MAX_ERROR_RATE, record
        assert result["requests_after_recovery"] > 0, record
        assert running_replicas() == 2 and len(replicas()) == 2
    finally:
        serve.shutdown()
        ray.shutdown()


async def load_and_kill(base: str, victim: dict, before: set[int]) -> dict:
    """4 clients send /v1/predict; after 100 requests the victim is SIGKILLed; load runs until Serve has
    2 RUNNING replicas again (the victim gone) and 3 s more, within MAX_REQUESTS and MAX_LOAD_S."""
    codes: Counter = Counter()
    done = 0
    stop = asyncio.Event()

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        while not stop.is_set() and done < MAX_REQUESTS:
            try:
                r = await c.post("/v1/predict", json={"text": f"where is my card {i}"})
                codes[r.status_code] += 1
            except httpx.HTTPError as err:
                codes[type(err).__name__] += 1
            done += 1

    def recovered() -> bool:
        now = replicas()
        return victim["Pid"] not in now and len(now) == 2 and running_replicas() == 2

    start = time.monotonic()
    deadline = start + MAX_LOAD_S
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=AUTH) as c:
        tasks = [asyncio.create_task(client(c, i)) for i in range(4)]
        while done < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        at_kill = done
        os.kill(victim["Pid"], signal.SIGKILL)
        killed = time.monotonic()
        back = False
        while (
            not back and time.monotonic() < min(deadline, killed + RECOVERY_TIMEOUT_S) and done < MAX_REQUESTS
        ):
            await asyncio.sleep(0.5)
            back = await asyncio.to_thread(recovered)  # Ray calls block: keep them off the clients' loop
        recovery_s = time.monotonic() - killed
        at_recovery = done
        if back:
            await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks)
    errors = sum(n for code, n in codes.items() if code != 200)
    return {
        "requests": done,
        "errors": errors,
        "requests_before_kill": at_kill,
        "requests_after_recovery": done - at_recovery,
        "recovered": back,
        "recovery_s": round(recovery_s, 1),
        "load_s": round(time.monotonic() - start, 1),
        "killed_pid": victim["Pid"],
        "new_replica_pids": sorted(set(replicas()) - before),
        "codes": codes,
    }


def test_sweep_on_the_cluster(cluster, sweep_project, monkeypatch):
    """4 trials through `hydra/launcher=ray_cluster`, the cluster named by $RAY_ADDRESS."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    start = time.monotonic()
    summary = test_sweep.run_sweep(
        sweep_project, ["-m", "hydra/launcher=ray_cluster", "model.lr=1e-3,3e-3,1e-2,3e-2"]
    )
    print(
        json.dumps(
            {
                "test": "sweep_on_cluster",
                "n_trials": summary["n_trials"],
                "sweep_s": round(time.monotonic() - start, 1),
            }
        )
    )
    assert summary["n_trials"] == 4
    assert {o for t in summary["trials"] for o in t["overrides"] if o.startswith("model.lr")} == {
        "model.lr=0.001",
        "model.lr=0.003",
        "model.lr=0.01",
        "model.lr=0.03",
    }


def test_cluster_stops_without_leftovers(cluster):
    assert cluster.pids("raylet"), "no raylet of this cluster was running"
    cluster.stop()
    assert cluster.pids("raylet") == [] and cluster.pids() == []
