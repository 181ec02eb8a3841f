"""The cluster deployment across real hosts (GitHub issue step 6): serving/cluster.yaml on a 2-node Ray cluster whose
nodes, storage and client are separate network namespaces on one private bridge (tests/netns.py).

Hosts (each its own address and loopback, nothing shared but the file system, which the test keeps apart by
giving each host its own folders):
    storage   moto's S3 server (bucket `intentops`: the registry at s3://intentops/registry, profiles under
              s3://intentops/profiles) and a throwaway PostgreSQL (the prediction store), both on its address
    head      the Ray head, with the dashboard on its address: `serve deploy --address` talks to its REST API
    worker    a Ray worker node, started in an empty folder (no models/ there, nor in the app's working dir)
    ci        where every client command runs: `intentops db upgrade`, `intentops registry stage/promote`,
              `intentops rollback`, `serve deploy`, and the HTTP load (`python test_multihost.py load ...`)
The test itself, in the root namespace, holds the bridge's address: it only polls (the dashboard's REST API,
/readyz, /v1/model), reads the replicas' logs (each node's own Ray temp dir) and, once, corrupts an object
in the bucket with boto3 the way a broken upload would.

What the test changes in serving/cluster.yaml, and nothing else (`shrink`): the IntentService deployment runs
exactly 2 replicas (num_replicas, or autoscaling min = initial = max = 2) of 1 CPU each (each node has 1 CPU, so
one per node), and the application's `working_dir` is local://<a copy of serving/, conf/ and params.yaml>.
The replicas get their settings the way the cluster's hosts would: from the Ray nodes' environment (`ray start`
with INTENTOPS_REGISTRY_URL, INTENTOPS_DB_URL, INTENTOPS_PROFILES_URL, INTENTOPS_API_KEY, AWS_*), plus a bundle
cache per host (INTENTOPS_BUNDLE_CACHE), since two hosts on one machine would otherwise share /tmp; replicas
that take serving.bundle_cache instead (/tmp/intentops/bundles) share one cache here, which is only safe because
a version is verified before it enters the cache, and again before it is loaded.

Ray's node health check is tuned on the head (the GCS runs the check), see HEALTH_CHECK: a node that stops
answering is declared dead after about threshold x (period + timeout) and its actors with it; Serve then drops
its replica. With Ray's defaults (3 s x 5, 10 s timeout: up to ~55 s) requests in flight to the lost node hang
until Serve's request_timeout_s (408) and the dead replica stays listed as RUNNING for about a minute. The
proxies' preference for a replica on their own node is off (ROUTING), or the cut could not fail anything.

Token auth is off on this private cluster (RAY_AUTH_MODE=disabled everywhere), so a ~/.ray/auth_token left by
other tests does not turn it on for the head only. Teardown never uses `ray stop` (it kills every Ray process
on the machine, other people's clusters included): it kills the processes in this test's namespaces, which
are only this test's, then deletes the namespaces, their cables and the bridge.

Order: deploy (1), a promotion and a rollback under load (2), a corrupt version refused under load (4), then
cutting the worker off (3) last, since it takes a node away for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("INTENTOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))
KEY = "multihost-test-key"
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]
TEXTS = ["where is my new card", "i lost my card yesterday", "what exchange rate do you use"]

# Ray's node health check (GCS -> raylet), set on `ray start` of both nodes (only the head's GCS uses them).
# 1 s x 3 failures with a 1 s timeout: a node that stops answering is dead after ~3 x (1 + 1) = 6 s. Measured here
# (4 clients on the head's proxy, worker cut 20 s into 60 s): with these, 1 error in ~3400 requests (a 500 for the
# request in flight on the lost replica), errors over 6 s after the cut, node DEAD at 6 s, its replica gone at 7 s;
# with Ray's defaults (3 s x 5, 10 s timeout), 3 errors (Serve's 408 at request_timeout_s = 10 s), errors over
# 10 s after the cut, and the node still ALIVE (its replica RUNNING) 40 s later. The cost: a node that misses
# three 1 s checks in a row is declared dead; fine on a private bridge, too tight across a real WAN.
HEALTH_CHECK = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
}
# Serve's proxies prefer a replica on their own node (RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING, on by default):
# the head's proxy would then never route to the worker's replica at this load, and cutting the worker off could
# not fail a single request through it. Off here, so the head's proxy spreads requests over both replicas, as it
# does whenever its own replica is busy: the worst case for a lost node.
ROUTING = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
RAY_DEFAULTS = {  # Ray 2.60's ray_config_def.h, printed next to the values in effect
    "RAY_health_check_initial_delay_ms": "5000",
    "RAY_health_check_period_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
    "RAY_health_check_timeout_ms": "10000",
}
SERVE_HEALTH_DEFAULTS = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0}

REPLICAS = 2
CLIENTS = 4
CUT_AFTER_S = 20.0
CUT_LOAD_S = 60.0
# Cut-off: the requests in flight to the lost node's replica when it goes may fail (at most one per client);
# nothing else may. 1 % of the load is the goal (issue step 6); the bound asserted is that and, separately,
# that errors stop within the health check's detection time plus Serve's reaction (RECOVERY_BOUND_S).
# Errors must stop within the detection time (~6 s, above) plus Serve's reaction (its controller and the
# proxy's router learn of the dead replica within about a second), with slack for this 2-core machine; Serve's
# request_timeout_s (10 s) bounds a request stuck on the lost replica in any case.
MAX_CUT_ERROR_RATE = 0.01
RECOVERY_BOUND_S = 15.0
STEP_TIMEOUT_S = 90.0

pytestmark = pytest.mark.slow


def progress(msg: str) -> None:
    print(f"[multihost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The load generator: run in the `ci` host as `python test_multihost.py load <json args>`.


async def _load(args: dict) -> None:
    import httpx

    stop_file = Path(args["stop_file"]) if args.get("stop_file") else None
    deadline = time.monotonic() + args["duration_s"]
    rows: list[list] = []

    async def client(i: int) -> None:
        target = i % len(args["targets"])
        transport = httpx.AsyncHTTPTransport(retries=0)
        async with httpx.AsyncClient(
            base_url=args["targets"][target],
            timeout=args["timeout_s"],
            headers={"X-API-Key": args["key"]},
            transport=transport,
            trust_env=False,
        ) as c:
            n = 0
            while time.monotonic() < deadline and not (stop_file and stop_file.exists()):
                start = time.time()
                version = None
                try:
                    r = await c.post("/v1/predict", json={"texts": [TEXTS[n % len(TEXTS)]]})
                    status: int | str = r.status_code
                    if r.status_code == 200:
                        version = r.json().get("model_version")
                except httpx.HTTPError as err:
                    status = type(err).__name__
                rows.append([start, time.time(), target, status, version])
                n += 1

    await asyncio.gather(*(client(i) for i in range(args["clients"])))
    Path(args["out"]).write_text(json.dumps(rows))


def load_main(argv: list[str]) -> None:
    asyncio.run(_load(json.loads(argv[0])))


if __name__ == "__main__" and sys.argv[1:2] == ["load"]:
    load_main(sys.argv[2:])
    sys.exit(0)

# ----------------------------------------------------------------------------------------------------------------
# The hosts and the cluster.

import httpx  # noqa: E402

import netns  # noqa: E402 - tests/ is on sys.path


@dataclass
class Site:
    """Everything the test built: the network, folders, addresses, the client environment."""

    net: netns.Network
    run: Path
    app: Path
    bundles: Path
    ci_env: dict[str, str]
    node_env: dict[str, str]
    deployed: dict = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def host(self, name: str) -> netns.Host:
        return self.net[name]

    @property
    def head_ip(self) -> str:
        return self.net["head"].ip

    def proxies(self) -> list[str]:
        return [f"http://{self.net['head'].ip}:8000", f"http://{self.net['worker'].ip}:8000"]

    def ci(self, *cmd: str, timeout: float = 120, check: bool = True):
        """Run a client command in the `ci` host from the app copy (params.yaml there, no models/)."""
        progress(f"ci$ {' '.join(cmd)}")
        proc = self.net["ci"].run(list(cmd), env=self.ci_env, cwd=self.app, timeout=timeout, check=check)
        out = (proc.stdout + proc.stderr).strip()
        if out:
            progress("   " + out.replace("\n", "\n    ")[-1500:])
        return proc

    def temp(self, host: str) -> Path:
        return self.run / host / "ray"


def base_env(run: Path, host: str) -> dict[str, str]:
    home = run / host / "home"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def start_postgres(host: netns.Host, root: Path) -> str:
    """A throwaway PostgreSQL on the host's address (trust auth inside the private subnet); returns its URL."""
    import pwd

    pg_bin = PG_BIN
    if not (pg_bin / "initdb").is_file():
        pytest.skip(f"PostgreSQL server binaries not found in {pg_bin} (set INTENTOPS_PG_BIN)")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' user to run the PostgreSQL server as (it refuses to run as root)")
    root.mkdir(parents=True)
    for d in (root.parent, root.parent.parent):  # mkdtemp makes 0700 folders: let the server user pass
        d.chmod(0o755)
    os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    as_pg = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    host.run(
        [
            *as_pg,
            str(pg_bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "intentops",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        env=env,
        cwd=root,
    )
    with open(data / "pg_hba.conf", "a") as fh:
        fh.write("host all all 10.0.0.0/8 trust\n")
    opts = f"-c listen_addresses={host.ip} -k {root} -p 5432 -c fsync=off -c max_connections=100"
    host.run(
        [
            *as_pg,
            str(pg_bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        ],
        env=env,
        cwd=root,
    )
    return f"postgresql+psycopg://intentops@{host.ip}:5432/postgres"


def wait_for(check, timeout_s: float, what: str, every_s: float = 0.5):
    start = time.monotonic()
    last = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last = err
        if time.monotonic() - start > timeout_s:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})"
            )
        time.sleep(every_s)


def s3_client(site: Site):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=site.node_env["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


def shrink(config: dict, app_dir: Path) -> dict:
    """serving/cluster.yaml with the test's only overrides: 2 replicas of 1 CPU, the app copy as working_dir."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        app.setdefault("runtime_env", {})["working_dir"] = f"local://{app_dir}"
        for dep in app.get("deployments", []):
            if dep.get("name") != "IntentService":
                continue
            if "autoscaling_config" in dep and dep["autoscaling_config"]:
                auto = dep["autoscaling_config"]
                auto.update(min_replicas=REPLICAS, initial_replicas=REPLICAS, max_replicas=REPLICAS)
            else:
                dep["num_replicas"] = REPLICAS
            dep.setdefault("ray_actor_options", {})["num_cpus"] = 1
    return config


def ray_start(site: Site, host: str, args: list[str]) -> None:
    h = site.host(host)
    cwd = site.run / host / "cwd"  # an empty folder: no models/ on this host
    cwd.mkdir(parents=True, exist_ok=True)
    env = {
        **base_env(site.run, host),
        **site.node_env,
        "INTENTOPS_BUNDLE_CACHE": str(site.run / host / "bundles"),
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        *args,
        f"--node-ip-address={h.ip}",
        "--num-cpus=1",
        "--object-store-memory=100000000",
        f"--temp-dir={site.temp(host)}",
        "--disable-usage-stats",
        "--log-style=record",
    ]
    progress(f"{host}$ ray start {' '.join(args)}")
    h.run(cmd, env=env, cwd=cwd, timeout=180)


def serve_details(site: Site) -> dict:
    r = httpx.get(f"http://{site.head_ip}:8265/api/serve/applications/", timeout=10, trust_env=False)
    r.raise_for_status()
    return r.json()


def replicas(site: Site) -> list[dict]:
    app = serve_details(site).get("applications", {}).get("intentops")
    if not app:
        return []
    return app["deployments"]["IntentService"]["replicas"]


def running_replicas(site: Site) -> list[dict]:
    return [r for r in replicas(site) if r.get("state") == "RUNNING"]


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=5, trust_env=False, headers={"X-API-Key": KEY}, **kw)


def replica_events(site: Site, event: str) -> dict[str, list[dict]]:
    """The JSON log lines of every IntentService replica that carry `event`, by host (each node's own logs)."""
    out: dict[str, list[dict]] = {}
    for host in ("head", "worker"):
        for log in (site.temp(host)).glob("session_*/logs/serve/replica_intentops_IntentService_*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if event not in line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rec["_file"] = log.name
                out.setdefault(host, []).append(rec)
    return out


@contextlib.contextmanager
def build_site() -> Iterator[Site]:
    """The four hosts, moto with the bucket, PostgreSQL, the app copy; all torn down on exit, even on failure."""
    t0 = time.monotonic()
    run = Path(tempfile.mkdtemp(prefix="iomh-", dir="/tmp"))  # short: Ray's unix sockets live under it
    pg_root = run / "storage" / "pg"
    net = netns.Network(["storage", "head", "worker", "ci"])
    try:
        net.create()
        progress(f"hosts up on {net.subnet}: " + ", ".join(f"{h.name}={h.ip}" for h in net.hosts.values()))
        storage = net["storage"]
        storage.popen(
            [str(BIN / "moto_server"), "-H", storage.ip, "-p", "5000"],
            env=base_env(run, "storage"),
            cwd=run / "storage",
            log=run / "storage" / "moto.log",
        )
        db_url = start_postgres(storage, pg_root)
        progress(f"storage: moto on {storage.ip}:5000, PostgreSQL at {db_url}")
        node_env = {
            "INTENTOPS_REGISTRY_URL": "s3://intentops/registry",
            "INTENTOPS_PROFILES_URL": "s3://intentops/profiles",
            "INTENTOPS_DB_URL": db_url,
            "INTENTOPS_API_KEY": KEY,
            "AWS_ENDPOINT_URL": f"http://{storage.ip}:5000",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            **HEALTH_CHECK,
            **ROUTING,
        }
        app = (
            run / "app"
        )  # the app as a host would have it: serving/, conf/, params.yaml; no models/, no data/
        shutil.copytree(ROOT / "serving", app / "serving", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "conf", app / "conf", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(ROOT / "params.yaml", app / "params.yaml")
        ci_env = {**base_env(run, "ci"), **{k: v for k, v in node_env.items() if not k.startswith("RAY_")}}
        ci_env["INTENTOPS_BUNDLE_CACHE"] = str(run / "ci" / "bundles")
        s = Site(net, run, app, run / "bundles", ci_env, node_env)
        wait_for(lambda: s3_client(s).list_buckets() is not None, 60, "moto's S3 server")
        s3_client(s).create_bucket(Bucket="intentops")
        yield s
    finally:
        progress("teardown: stopping PostgreSQL, killing the hosts' processes, deleting the namespaces")
        try:
            if (pg_root / "data" / "postmaster.pid").exists():
                net["storage"].run(
                    [
                        "setpriv",
                        "--reuid=postgres",
                        "--regid=postgres",
                        "--init-groups",
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(pg_root / "data"),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                    env={"PATH": "/usr/bin:/bin"},
                    check=False,
                    timeout=60,
                )
        except Exception as err:  # noqa: BLE001
            progress(f"pg_ctl stop: {err}")
        net.close()
        left = net.leftovers()
        if os.environ.get("MULTIHOST_KEEP"):
            progress(f"kept {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)
        progress(f"teardown done ({time.monotonic() - t0:.0f} s since setup began); leftovers: {left}")


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    if not (ROOT / "serving" / "cluster.yaml").is_file():
        pytest.skip("serving/cluster.yaml is missing")
    with build_site() as s:
        yield s


# ----------------------------------------------------------------------------------------------------------------
# Load from the `ci` host.


@dataclass
class Load:
    proc: object
    out: Path
    stop_file: Path
    started: float

    def stop(self) -> None:
        self.stop_file.touch()

    def rows(self, timeout_s: float = 120) -> list[list]:
        self.proc.wait(timeout=timeout_s)
        assert self.proc.returncode == 0, (
            f"the load generator failed ({self.proc.returncode}), see {self.out}.log"
        )
        return json.loads(self.out.read_text())


def start_load(site: Site, name: str, targets: list[str], duration_s: float, timeout_s: float = 30) -> Load:
    """CLIENTS closed-loop clients (client i -> targets[i % n]), one text per request, no retries."""
    out = site.run / "ci" / f"load-{name}.json"
    stop_file = site.run / "ci" / f"load-{name}.stop"
    args = {
        "targets": targets,
        "clients": CLIENTS,
        "duration_s": duration_s,
        "timeout_s": timeout_s,
        "key": KEY,
        "out": str(out),
        "stop_file": str(stop_file),
    }
    proc = site.host("ci").popen(
        [sys.executable, str(Path(__file__).resolve()), "load", json.dumps(args)],
        env=site.ci_env,
        cwd=site.run / "ci",
        log=Path(f"{out}.log"),
    )
    progress(f"load {name!r}: {CLIENTS} clients -> {targets} for up to {duration_s:.0f} s")
    return Load(proc, out, stop_file, time.time())


def summarize(rows: list[list]) -> dict:
    codes = Counter(str(r[3]) for r in rows)
    return {
        "requests": len(rows),
        "errors": sum(n for c, n in codes.items() if c != "200"),
        "status_codes": dict(codes),
        "versions": dict(Counter(r[4] for r in rows if r[4])),
    }


def stage(site: Site, bundle: Path) -> str:
    out = site.ci("intentops", "registry", "stage", str(bundle)).stdout
    return out.split("candidate:", 1)[1].split()[0]


def wait_for_event(site: Site, event: str, since: float, match, what: str, hosts=("head", "worker")) -> dict:
    """Wait until every replica host's log has a line with `event` logged after `since` for which match(rec)."""

    def seen() -> dict | None:
        found = {}
        for host, recs in replica_events(site, event).items():
            hits = [r for r in recs if match(r) and _log_time(r) >= since - 1.0]
            if hits:
                found[host] = hits[-1]
        return found if all(h in found for h in hosts) else None

    try:
        return wait_for(seen, STEP_TIMEOUT_S, what)
    except AssertionError as err:  # say what the replicas did meanwhile, or a CI failure cannot be explained
        raise AssertionError(f"{err}\n{replica_story(site, since)}") from None


def replica_story(site: Site, since: float, per_host: int = 40) -> str:
    """The replicas' own log lines (not the request log) logged after `since`, per host, for a failure message."""
    lines = []
    for host in ("head", "worker"):
        recs = []
        for log in sorted(
            site.temp(host).glob("session_2*/logs/serve/replica_intentops_IntentService_*.log")
        ):
            if log.name.endswith(".requests.log"):
                continue
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if _log_time(rec) >= since - 5:
                        recs.append(
                            f"  {rec.get('asctime')} {log.name[-12:-4]} {str(rec.get('message'))[:300]!r}"
                        )
        lines += [f"{host} replica log since the step began ({len(recs)} lines, the last {per_host}):"]
        lines += recs[-per_host:]
    return "\n".join(lines)


def _log_time(rec: dict) -> float:
    """A Serve JSON log line's time (`timestamp_ns`, else `asctime`), as a Unix time."""
    if "timestamp_ns" in rec:
        return rec["timestamp_ns"] / 1e9
    import datetime as dt

    asctime = rec.get("asctime", "")
    try:
        return dt.datetime.strptime(asctime, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return 0.0


def model_info(site: Site, proxy: str) -> dict:
    r = get(f"{proxy}/v1/model")
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def cluster(site: Site) -> Site:
    """Step 1: model A in production, the Ray cluster up, serving/cluster.yaml deployed, 2 replicas on 2 hosts."""
    import yaml

    from support import write_tiny_onnx_bundle

    t0 = time.monotonic()
    bundles = {
        "A": write_tiny_onnx_bundle(site.bundles / "A", LABELS, confident=True, card={"name": "A"}),
        "B": write_tiny_onnx_bundle(site.bundles / "B", LABELS, confident=False, card={"name": "B"}),
        "C": write_tiny_onnx_bundle(site.bundles / "C", LABELS[::-1], confident=True, card={"name": "C"}),
    }
    assert len(set(bundles.values())) == 3, bundles
    site.ci("intentops", "db", "upgrade")
    site.versions["A"] = stage(site, site.bundles / "A")
    assert site.versions["A"] == bundles["A"]
    site.ci("intentops", "registry", "promote")
    site.versions.update(B=bundles["B"], C=bundles["C"])

    ray_start(
        site,
        "head",
        ["--head", "--port=6379", "--include-dashboard=true", f"--dashboard-host={site.head_ip}"],
    )
    ray_start(site, "worker", [f"--address={site.head_ip}:6379"])

    config = shrink(yaml.safe_load((ROOT / "serving" / "cluster.yaml").read_text()), site.app)
    site.deployed = config
    path = site.run / "ci" / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    site.ci("serve", "deploy", str(path), "--address", f"http://{site.head_ip}:8265", timeout=180)

    def ready() -> bool:
        running = running_replicas(site)
        if len(running) != REPLICAS:
            return False
        return all(get(f"{p}/readyz").status_code == 200 for p in site.proxies())

    wait_for(ready, 240, f"{REPLICAS} RUNNING replicas and /readyz 200 on both proxies", every_s=2.0)
    nodes = {r["node_ip"] for r in running_replicas(site)}
    versions = {p: model_info(site, p)["version"] for p in site.proxies()}
    progress(f"deployed in {time.monotonic() - t0:.0f} s: replicas on {sorted(nodes)}, serving {versions}")
    assert nodes == {site.head_ip, site.host("worker").ip}, f"replicas not one per host: {nodes}"
    assert set(versions.values()) == {site.versions["A"]}
    return site


def test_deploy_spans_both_hosts(cluster: Site):
    """Step 1: both proxies ready, one replica per host, both serving A, the worker without a models/ folder."""
    assert not (cluster.app / "models").exists() and not (cluster.run / "worker" / "cwd" / "models").exists()
    for proxy in cluster.proxies():
        r = httpx.post(
            f"{proxy}/v1/predict",
            json={"texts": TEXTS},
            headers={"X-API-Key": KEY},
            timeout=10,
            trust_env=False,
        )
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == cluster.versions["A"]
        denied = httpx.post(f"{proxy}/v1/predict", json={"texts": TEXTS}, timeout=10, trust_env=False)
        assert denied.status_code == 401, denied.text  # auth: required


def test_promote_and_rollback_under_load(cluster: Site):
    """Step 2: stage B and promote it under load (both proxies): every replica swaps to B; roll back: every
    replica swaps back to A; no request fails."""
    site, a, b = cluster, cluster.versions["A"], cluster.versions["B"]
    load = start_load(site, "swap", site.proxies(), duration_s=STEP_TIMEOUT_S * 3)
    try:
        time.sleep(3)
        assert stage(site, site.bundles / "B") == b
        t_promote = time.time()
        site.ci("intentops", "registry", "promote")
        swapped = wait_for_event(
            site, "model_loaded", t_promote, lambda r: r.get("model_version") == b, "both replicas on B"
        )
        t_b = max(_log_time(r) for r in swapped.values())
        progress(f"B on both hosts {t_b - t_promote:.1f} s after promote")
        time.sleep(3)
        t_rollback = time.time()
        site.ci("intentops", "rollback")
        back = wait_for_event(
            site, "model_loaded", t_rollback, lambda r: r.get("model_version") == a, "both replicas back on A"
        )
        t_a = max(_log_time(r) for r in back.values())
        progress(f"A on both hosts {t_a - t_rollback:.1f} s after rollback")
        time.sleep(3)
    finally:
        load.stop()
    rows = load.rows()
    s = summarize(rows)
    on_b = [r for r in rows if t_b + 0.5 < r[0] and r[1] < t_rollback]
    after = [r for r in rows if r[0] > t_a + 0.5]
    record = {
        "test": "multihost_swap",
        **s,
        "promote_to_all_replicas_s": round(t_b - t_promote, 1),
        "rollback_to_all_replicas_s": round(t_a - t_rollback, 1),
        "requests_on_b_window": len(on_b),
        "requests_after_rollback": len(after),
    }
    print(json.dumps(record))
    assert s["errors"] == 0, record
    assert on_b and {r[4] for r in on_b} == {b}, record
    assert {r[2] for r in on_b} == {0, 1}, "both proxies answered with B"
    assert after and {r[4] for r in after} == {a}, record


def test_corrupt_version_is_refused_under_load(cluster: Site):
    """Step 4: a version whose files in the bucket do not match it is promoted: every replica refuses it (logs it,
    /v1/model reports the failed reload) and keeps serving A; no request fails. Then rolled back."""
    import intentops.inference.bundle as layout

    site, a, c = cluster, cluster.versions["A"], cluster.versions["C"]
    assert stage(site, site.bundles / "C") == c
    s3 = s3_client(site)
    key = f"registry/{c}/{layout.ONNX_FILE}"
    body = bytearray(s3.get_object(Bucket="intentops", Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # one flipped byte in the graph's weights
    s3.put_object(Bucket="intentops", Key=key, Body=bytes(body))
    progress(f"corrupted s3://intentops/{key}")
    load = start_load(site, "corrupt", site.proxies(), duration_s=STEP_TIMEOUT_S * 3)
    try:
        time.sleep(3)
        t_promote = time.time()
        site.ci("intentops", "registry", "promote")
        refused = wait_for_event(
            site, "model load failed", t_promote, lambda r: c in json.dumps(r), "both replicas refusing C"
        )
        progress(f"C refused on both hosts: {next(iter(refused.values())).get('message', '')[:300]}")

        def reported() -> dict | None:
            infos = [model_info(site, p) for p in site.proxies() for _ in range(4)]
            return infos if all(i["reload"] and i["version"] == a for i in infos) else None

        infos = wait_for(reported, 30, "/v1/model reporting the failed reload on both proxies")
        time.sleep(2)
        t_rollback = time.time()
        site.ci("intentops", "rollback")
        wait_for(
            lambda: all(model_info(site, p)["reload"] is None for p in site.proxies() for _ in range(4)),
            30,
            "the failed reload cleared after the rollback",
        )
        time.sleep(2)
    finally:
        load.stop()
    rows = load.rows()
    s = summarize(rows)
    record = {
        "test": "multihost_corrupt_refused",
        **s,
        "reload_report": infos[0]["reload"],
        "rollback_clear_s": round(time.time() - t_rollback, 1),
    }
    print(json.dumps(record, default=str))
    assert s["errors"] == 0, record
    assert set(s["versions"]) == {a}, record
    caches = {Path(i["bundle"]).parent for i in infos}  # where the replicas keep verified versions
    cached = [p for cache in caches for p in cache.glob(f"{c}*")]
    assert not cached, f"a corrupt version was kept in a bundle cache: {cached}"


def node_states(site: Site) -> dict[str, str]:
    """Ray's view of the nodes, {node ip: ALIVE | DEAD}, from the dashboard (ray.util.state, a public API)."""
    from ray.util.state import list_nodes

    return {n.node_ip: n.state for n in list_nodes(address=f"http://{site.head_ip}:8265", timeout=5)}


def watch_worker(site: Site, since: float, timeout_s: float) -> dict[str, float | None]:
    """Seconds after `since` when Ray declared the worker node DEAD and when Serve stopped listing its replica
    as RUNNING (None: not within timeout_s)."""
    worker = site.host("worker").ip
    out: dict[str, float | None] = {"node_dead_after_s": None, "replica_gone_after_s": None}
    deadline = since + timeout_s
    while time.time() < deadline and None in out.values():
        try:
            if out["node_dead_after_s"] is None and node_states(site).get(worker) == "DEAD":
                out["node_dead_after_s"] = round(time.time() - since, 1)
            if out["replica_gone_after_s"] is None and not any(
                r["node_ip"] == worker for r in running_replicas(site)
            ):
                out["replica_gone_after_s"] = round(time.time() - since, 1)
        except Exception as err:  # noqa: BLE001 - the dashboard is busy: ask again
            progress(f"watch: {err!r}")
        time.sleep(0.5)
    return out


def test_worker_cut_off_under_load(cluster: Site):
    """Step 3: the worker host is unplugged CUT_AFTER_S into a CUT_LOAD_S load on the head's proxy (no retries):
    the service recovers by itself; errors <= 1 %, and none later than RECOVERY_BOUND_S after the cut."""
    site = cluster
    load = start_load(site, "cut", [f"http://{site.head_ip}:8000"], duration_s=CUT_LOAD_S)
    time.sleep(CUT_AFTER_S - (time.time() - load.started))
    t_cut = time.time()
    site.host("worker").cut()
    progress(f"worker cut off ({site.host('worker').veth} down) at {CUT_AFTER_S:.0f} s into the load")
    seen = watch_worker(site, t_cut, timeout_s=CUT_LOAD_S - CUT_AFTER_S)
    rows = load.rows(timeout_s=CUT_LOAD_S + 60)
    s = summarize(rows)
    errors = [r for r in rows if r[3] != 200]
    last_error_end = max((r[1] for r in errors), default=t_cut)
    after_recovery = [r for r in rows if r[0] > last_error_end]
    deployment = next(
        d for app in site.deployed["applications"] for d in app["deployments"] if d["name"] == "IntentService"
    )
    record = {
        "test": "multihost_worker_cut",
        **s,
        "error_rate": round(s["errors"] / max(1, s["requests"]), 5),
        "errors_before_cut": sum(1 for r in errors if r[1] < t_cut),
        "first_error_after_cut_s": round(min((r[1] for r in errors), default=t_cut) - t_cut, 1),
        "errors_stopped_after_cut_s": round(max(0.0, last_error_end - t_cut), 1),
        "max_latency_after_cut_s": round(max((r[1] - r[0] for r in rows if r[1] > t_cut), default=0), 1),
        "requests_after_recovery": len(after_recovery),
        "worker": seen,
        "ray_health_check": {**RAY_DEFAULTS, **HEALTH_CHECK},
        "serve_health_check": {k: deployment.get(k, default) for k, default in SERVE_HEALTH_DEFAULTS.items()},
        "proxy_prefer_local_node_routing": site.node_env.get(
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "1"
        ),
    }
    print(json.dumps(record))
    alive = wait_for(
        lambda: [r for r in running_replicas(site) if r["node_ip"] == site.head_ip],
        30,
        "the head's replica RUNNING",
    )
    assert alive
    assert record["errors_before_cut"] == 0, record
    assert record["error_rate"] <= MAX_CUT_ERROR_RATE, record
    assert record["errors_stopped_after_cut_s"] <= RECOVERY_BOUND_S, record
    assert len(after_recovery) > 100 and all(r[3] == 200 for r in after_recovery), record
