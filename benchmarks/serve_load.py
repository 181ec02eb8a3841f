"""Load-test the intent API on loopback and print ONE JSON line: raw model, Serve overhead (echo), live endpoint.

    python benchmarks/serve_load.py [--bundle production|DIR] [--variant fp32|int8] [--scale 1.0]
                                    [--repeat 3] [--profile DIR] [key=value ...]

Starts everything itself (a local Ray with 2 CPUs, Serve on 127.0.0.1) and stops it; every level is
bounded by a request count and a time cap. Each run measures, on the same machine and bundle:
  raw   the Predictor in-process at the replica's ONNX Runtime threads (`raw_*`; every core: `raw_best_*`):
        batched throughput (sentences/s) and single-sentence latency
  echo  a no-op deployment behind the same Serve HTTP proxy and FastAPI layer, at concurrency 1 and 32
  live  the API (intentops.api.service) at concurrency 1, 8 and 32 (one text per request), then 4 clients
        sending lists of 32 texts
`--repeat N` runs it all N times (a fresh Ray each time): every figure is the median of the runs, and
`spread` gives [min, max] of the headline ones. The headline figures:
  replica_overhead_ms   CPU ms per request the replica spends beyond Serve (echo) and the model, at c32:
                        live replica CPU/request - echo replica CPU/request - model CPU/request, the last
                        measured in-process as CPU time at the replica's threads and at the batch size the
                        replica formed (`c32_formed_batch`, from its request log)
  ratio_c32_vs_ceiling  c32 rps over 1 / (1/echo_c32_rps + 1/raw_best_sents_per_s): the rate if HTTP and the
                        model shared the CPU with no other loss
  c1_over_ms            c1 p50 - (echo c1 p50 + raw single-sentence ms): latency one request adds
  list32_vs_raw         texts/s of the list clients over raw sentences/s (at the replica's threads)
`cpu_ms_per_req` splits the CPU time of each HTTP phase between Serve's proxy, the replica, Ray's daemons,
this client and everything else on the machine ("other": a loaded machine shows here), from /proc.
`--profile DIR` samples the replica with py-spy during the first run's c32 phase (all threads, and the
thread holding the GIL only) and adds its top frames. key=value pairs override serving user_config (e.g.
batching.max_batch_size=16). RAY_SERVE_* variables in the environment reach every Ray process, so they apply
to echo and live alike (`ray_serve_env`); RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD defaults to 0, as
serving/config.yaml deploys it. `variant` and its test accuracy (from the bundle's card) say which graph was served.

`--shadow RATE` measures the shadow challenger instead (serving.shadow, intentops.api.shadow): the bundle is
registered in a throwaway registry as production, a copy of it (same graph, resealed under another version: the
same cost as a real challenger) is staged as the candidate, and one live deployment is load-tested at c32
`--repeat` times with shadow off and on alternately (reconfigured in place): `shadow` gives the replica's CPU
ms per request each way (median, [min, max], every run), the added share, and the shadow rows stored.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTLE_S = 10.0  # idle seconds after a deployment starts, before its first phase
TEXTS = [
    "When will my new card arrive?",
    "I lost my card yesterday, please block it",
    "What exchange rate do you use for euros?",
    "My top up failed again",
    "my PIN is blocked, help",
    "Why was I charged twice for the same payment?",
    "How do I verify my identity?",
    "I want to cancel a transfer I just made",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")
    )


# --- CPU accounting ----------------------------------------------------------------------------------------
# Processes whose CPU time is reported apart (by command line); "other" is everything else on the machine.
CPU_GROUPS = {
    "proxy": b"ProxyActor",
    "replica": b"ServeReplica",
    "raylet": b"raylet",
    "gcs": b"gcs_server",
    "agent": b"agent",
    "log_monitor": b"log_monitor",
}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by Serve's proxy, the replicas, Ray's daemons, this client, and the machine (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys([*CPU_GROUPS, "client"], 0.0)
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = "client" if pid == me else next((k for k, m in CPU_GROUPS.items() if m in cmd), None)
        if kind:
            out[kind] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    with open("/proc/stat") as fh:
        total = [int(v) for v in fh.readline().split()[1:]]
    out["all"] = (sum(total) - total[3] - total[4]) / tick  # minus idle and iowait
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """ms of CPU per request in each process group and in everything else ("other"), between two cpu_seconds()."""
    d = {k: after[k] - before[k] for k in after}
    d["other"] = d.pop("all") - sum(d.values())
    return {k: round(1000 * v / max(requests, 1), 2) for k, v in d.items()}


# --- raw -------------------------------------------------------------------------------------------------------
def measure_raw(
    bundle: Path, batch_size: int, num_threads: int, variant: str | None = None, seconds: float = 4.0
) -> dict:
    """The Predictor in this process: batched sentences/s, CPU ms per batch, and single-sentence latency.

    CPU is this process's CPU time (all its threads), so it counts ONNX Runtime's pool when num_threads > 1.
    """
    from intentops.inference.predictor import Predictor

    predictor = Predictor.load(bundle, threads=num_threads, variant=variant)
    if predictor.meta.get("format") == "torch":  # the serving image has no torch: ONNX takes `threads`
        import torch

        torch.set_num_threads(num_threads)
    batch = [TEXTS[i % len(TEXTS)] for i in range(batch_size)]
    predictor.predict(batch, top_k=3)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        predictor.predict(batch, top_k=3)
        n += batch_size
    sents_per_s = n / (time.perf_counter() - start)
    cpu_ms_per_batch = (time.process_time() - cpu) * 1000 / (n / batch_size)
    single = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 2 and len(single) < 300:
        t = time.perf_counter()
        predictor.predict([TEXTS[len(single) % len(TEXTS)]], top_k=3)
        single.append((time.perf_counter() - t) * 1000)
    return {
        "sents_per_s": sents_per_s,
        "single_ms": statistics.median(single),
        "cpu_ms_per_batch": cpu_ms_per_batch,
    }


# --- HTTP load ---------------------------------------------------------------------------------------------
async def load(
    url: str, concurrency: int, requests: int, max_s: float, texts_per_request: int = 1, warmup: int = 0
) -> dict:
    """`concurrency` clients send `requests` POSTs in all (or stop at max_s); latency percentiles in ms."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(i: int) -> float | None:
            body = (
                {"text": TEXTS[i % len(TEXTS)]}
                if texts_per_request == 1
                else {"texts": [TEXTS[(i + j) % len(TEXTS)] for j in range(texts_per_request)]}
            )
            t = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            return (time.perf_counter() - t) * 1000 if ok else None

        for i in range(warmup):
            await one(i)
        cpu_before = cpu_seconds()
        deadline = time.perf_counter() + max_s

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                ms = await one(sent)
                if ms is None:
                    errors += 1
                else:
                    latencies.append(ms)

        start, wall_start = time.perf_counter(), time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = cpu_per_request(cpu_before, cpu_seconds(), len(latencies) + errors)
    done = len(latencies)
    return {
        "rps": done / elapsed,
        "texts_per_s": done * texts_per_request / elapsed,
        "requests": done + errors,
        "errors": errors,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "cpu_ms_per_req": cpu,
        "window": (wall_start, wall_start + elapsed),  # wall-clock span, to find its request log lines
    }


def echo_deployment(serve, schemas):
    """A no-op with the app's FastAPI layer and request model: what Serve + HTTP cost without the model."""
    from fastapi import FastAPI

    echo_api = FastAPI()

    @serve.deployment(
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 1},
        logging_config={"encoding": "JSON", "enable_access_log": False},
    )
    @serve.ingress(echo_api)
    class Echo:
        @echo_api.post("/v1/predict")
        async def predict(self, body: schemas.PredictRequest) -> dict:
            return {"predictions": [{"intent": "echo", "confidence": 1.0}]}

    return Echo


def variant_accuracy(bundle_dir: Path, variant: str | None) -> dict:
    """The served graph's test accuracy and macro-F1 as the export stage measured them (model card)."""
    card = Path(bundle_dir) / "card.json"
    export = json.loads(card.read_text()).get("metrics", {}).get("export", {}) if card.is_file() else {}
    m = export.get(variant or "fp32", {})
    return {"variant_accuracy": m.get("accuracy"), "variant_macro_f1": m.get("macro_f1")}


def parse_overrides(pairs: list[str]) -> dict:
    """key.sub=value pairs (values as JSON where they parse) into a nested dict."""
    out: dict = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def formed_batch(log_dir: Path, window: tuple[float, float]) -> tuple[float, float]:
    """Texts per model call the replica formed in a phase of single-text requests, and the model's CPU ms per
    request inside the replica (each call's `model_cpu_ms` shared by its texts), from its request log.

    Each request's line carries the size of the call that served it; a call of b texts has b such lines, so
    calls = sum(1/b) over lines and texts per call = lines / calls.
    """
    sizes, cpu = [], []
    for path in log_dir.glob("replica_*IntentService*.requests.log"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if window[0] <= rec["timestamp"] <= window[1] + 1 and rec.get("batch_size"):
                sizes.append(rec["batch_size"])
                cpu.append(rec.get("model_cpu_ms", float("nan")) / rec["batch_size"])
    if not sizes:
        return float("nan"), float("nan")
    return len(sizes) / sum(1 / b for b in sizes), sum(cpu) / len(cpu)


def replica_pid() -> int | None:
    """The process id of the intentops replica (by command line), for py-spy."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"ServeReplica:intentops" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except OSError:
            continue
    return None


def profiled(out_dir: Path, seconds: float):
    """Start py-spy on the replica for `seconds` (raw collapsed stacks, then a flame graph); returns the processes."""
    import subprocess
    import sys

    pid = replica_pid()
    spy = Path(sys.executable).with_name("py-spy")
    if pid is None or not spy.is_file():
        raise SystemExit(f"--profile needs py-spy beside {sys.executable} (pip install py-spy) and a replica")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Two views at once: every thread's samples (where the time goes, ONNX Runtime included) and only the
    # samples of the thread holding the GIL (Python's CPU: ONNX Runtime releases the GIL while it runs).
    return [
        subprocess.Popen(
            [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
            + extra
            + ["--format", "raw", "--output", str(out_dir / name), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for extra, name in (([], "replica_c32.txt"), (["--gil"], "replica_c32_gil.txt"))
    ]


def top_frames(collapsed: Path, n: int = 15) -> list[dict]:
    """The frames with the most samples in py-spy's collapsed stacks: inclusive (anywhere on a stack) and self (top)."""
    from collections import Counter

    total, inclusive, own = 0, Counter(), Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        k = int(count)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            inclusive[f] += k
    pct = lambda c: round(100 * c / max(total, 1), 1)  # noqa: E731
    return {
        "samples": total,
        "self": [{"frame": f, "pct": pct(c)} for f, c in own.most_common(n)],
        "inclusive": [{"frame": f, "pct": pct(c)} for f, c in inclusive.most_common(n)],
    }


def run_once(ctx: dict, profile: Path | None) -> dict:
    """One complete measurement: raw in-process, then echo and live over HTTP on a fresh local Ray."""
    import ray
    from ray import serve

    from intentops.api import schemas
    from intentops.api.service import IntentService
    from intentops.feedback import store

    user_config, bundle_dir, n = ctx["user_config"], ctx["bundle_dir"], ctx["n"]
    threads, batch = user_config["num_threads"], user_config["batching"]["max_batch_size"]
    raws = {
        t: measure_raw(bundle_dir, batch, t, user_config["variant"])
        for t in sorted({threads, os.cpu_count()})
    }
    out: dict = {"load_avg_1m_before": round(os.getloadavg()[0], 2)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="intentops-load-") as tmp:
        db = Path(tmp) / "queue.db"
        engine = store.make_engine(f"sqlite:///{db}")
        store.upgrade(engine)
        engine.dispose()
        user_config = {**user_config, "store": {**user_config["store"], "db": str(db)}}
        user_config["monitoring"] = {**user_config["monitoring"], "profiles": str(Path(tmp) / "profiles")}
        logs = Path(tmp) / "logs"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(echo_deployment(serve, schemas).bind(), name="echo", route_prefix="/echo")
            time.sleep(SETTLE_S)  # Ray's start-up work (workers, GCS, metrics) would slow the first phase
            echo1 = asyncio.run(load(f"{base}/echo/v1/predict", 1, n(300), 30, warmup=20))
            echo32 = asyncio.run(load(f"{base}/echo/v1/predict", 32, n(1500), 30, warmup=20))
            serve.delete("echo")

            logging_config = {"encoding": "JSON", "enable_access_log": False, "logs_dir": str(logs)}
            service = IntentService.options(user_config=user_config, logging_config=logging_config)
            serve.run(service.bind(), name="intentops", route_prefix="/")
            time.sleep(SETTLE_S)  # the same for the live deployment's start (model load, first windows)
            url = f"{base}/v1/predict"
            # what the replica serves: an int8 graph export marked unfit is served as fp32 unless forced
            with urllib.request.urlopen(f"{base}/v1/model", timeout=30) as r:
                out["variant_served"] = json.loads(r.read())["variant"]
            live = {}
            for c, k in ((1, 200), (8, 600), (32, 1200)):
                spies = profiled(profile, 12) if profile and c == 32 else []
                live[c] = asyncio.run(load(url, c, n(k), 40, warmup=20 if c == 1 else 0))
                for p in spies:
                    p.wait(timeout=60)
            batch = asyncio.run(load(url, 4, n(60), 40, texts_per_request=32))
            time.sleep(1.5)  # the replica flushes its request log at least once a second
        finally:
            serve.shutdown()
            ray.shutdown()
        formed, in_replica = formed_batch(logs, live[32]["window"])
    # The model's CPU per request at c32: a call of the size the replica formed, at the replica's threads.
    model = measure_raw(bundle_dir, max(1, round(formed)), threads, user_config["variant"], seconds=3.0)
    return out | summarise_run(raws, threads, echo1, echo32, live, batch, formed, model, in_replica)


def summarise_run(raws, threads, echo1, echo32, live, batch, formed, model, in_replica=float("nan")) -> dict:
    """One run's figures (see the module docstring for each)."""
    raw, best = raws[threads], max(raws.values(), key=lambda r: r["sents_per_s"])
    rep = lambda r: r["cpu_ms_per_req"]["replica"]  # noqa: E731
    model_ms = model["cpu_ms_per_batch"] / max(1, round(formed))
    ceiling = 1 / (1 / echo32["rps"] + 1 / best["sents_per_s"])
    out = {
        "raw_sents_per_s": round(raw["sents_per_s"], 1),
        "raw_single_ms": round(raw["single_ms"], 2),
        "raw_best_sents_per_s": round(best["sents_per_s"], 1),
        "raw_best_single_ms": round(min(r["single_ms"] for r in raws.values()), 2),
        "raw_by_threads": {t: round(r["sents_per_s"], 1) for t, r in raws.items()},
        "echo_c1_rps": round(echo1["rps"], 1),
        "echo_c1_p50_ms": round(echo1["p50_ms"], 2),
        "echo_c32_rps": round(echo32["rps"], 1),
        "echo_c32_p50_ms": round(echo32["p50_ms"], 2),
    }
    for c, r in live.items():
        out |= {
            f"c{c}_{k}": round(r[k], 2 if k != "rps" else 1) for k in ("rps", "p50_ms", "p95_ms", "p99_ms")
        }
    return out | {
        "c32_formed_batch": round(formed, 2),
        "model_cpu_ms_per_req_c32": round(model_ms, 3),
        "replica_overhead_ms": round(rep(live[32]) - rep(echo32) - model_ms, 2),
        # the same with the model's CPU as the replica's own threads spent it (contention with the proxy shows)
        "model_cpu_ms_per_req_c32_in_replica": round(in_replica, 3),
        "replica_overhead_in_replica_ms": round(rep(live[32]) - rep(echo32) - in_replica, 2),
        "c1_over_ms": round(live[1]["p50_ms"] - echo1["p50_ms"] - raw["single_ms"], 2),
        "list32_c4_texts_per_s": round(batch["texts_per_s"], 1),
        "list32_c4_p50_ms": round(batch["p50_ms"], 2),
        "list32_vs_raw": round(batch["texts_per_s"] / raw["sents_per_s"], 3),
        "list32_vs_raw_best": round(batch["texts_per_s"] / best["sents_per_s"], 3),
        "ceiling_rps": round(ceiling, 1),
        "ratio_c32_vs_ceiling": round(live[32]["rps"] / ceiling, 3),
        "errors": sum(r["errors"] for r in (echo1, echo32, batch, *live.values())),
        "cpu_ms_per_req": {
            "echo_c32": echo32["cpu_ms_per_req"],
            "c32": live[32]["cpu_ms_per_req"],
            "c1": live[1]["cpu_ms_per_req"],
            "echo_c1": echo1["cpu_ms_per_req"],
            "list32_c4": batch["cpu_ms_per_req"],
        },
    }


HEADLINE = (
    "replica_overhead_ms",
    "ratio_c32_vs_ceiling",
    "c1_over_ms",
    "list32_vs_raw",
    "list32_vs_raw_best",
    "c32_rps",
    "c1_p50_ms",
    "raw_sents_per_s",
    "errors",
)


def median_of(runs: list):
    """The per-key median of runs' figures (nested dicts alike); non-numbers from the first run."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(runs), 3)
    return first


# --- shadow challenger -------------------------------------------------------------------------------------------
def shadow_registry(bundle_dir: Path, dest: Path) -> tuple[str, str]:
    """A registry at `dest` with the bundle in production and a resealed copy staged as the candidate."""
    import shutil

    from intentops.inference import bundle as layout
    from intentops.inference.registry import Registry

    registry = Registry.at(dest)
    champion = layout.verify_bundle(bundle_dir)["version"]
    registry.add(bundle_dir, champion)
    registry.set_production(champion, "promote", "the benchmark champion")
    copy = dest.parent / "challenger"
    shutil.copytree(bundle_dir, copy)
    cal = copy / layout.CALIBRATION_FILE  # the same calibration in other bytes: another content version
    cal.write_text(json.dumps(json.loads(cal.read_text()), indent=3) + "\n\n")
    challenger = layout.seal(copy)
    registry.stage(copy, challenger, "benchmark challenger")
    return champion, challenger


def shadow_rows(db: Path) -> int:
    from intentops.feedback import store

    engine = store.make_engine(f"sqlite:///{db}")
    try:
        return len(store.table_rows(engine, store.shadow_scores))
    finally:
        engine.dispose()


def shadow_summary(off: list[dict], on: list[dict]) -> dict:
    """Replica CPU ms per request at c32 with shadow off and on: medians, spreads, the added share."""
    rep = lambda runs: [r["cpu_ms_per_req"]["replica"] for r in runs]  # noqa: E731
    out = {}
    for name, runs in (("off", off), ("on", on)):
        cpu = rep(runs)
        out[name] = {
            "replica_cpu_ms_per_req": round(statistics.median(cpu), 3),
            "spread": [min(cpu), max(cpu)],
            "runs": cpu,
            "c32_rps": round(statistics.median(r["rps"] for r in runs), 1),
            "c32_p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
            "errors": sum(r["errors"] for r in runs),
        }
    base = out["off"]["replica_cpu_ms_per_req"]
    out["added_pct"] = round(100 * (out["on"]["replica_cpu_ms_per_req"] - base) / base, 2)
    return out


def run_shadow(ctx: dict, rate: float, repeat: int) -> dict:
    """c32 on the live API, shadow off and on alternately `repeat` times each, on one fresh local Ray."""
    import ray
    from ray import serve

    from intentops.api.service import IntentService
    from intentops.feedback import store

    n = ctx["n"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="intentops-shadow-") as tmp:
        db = Path(tmp) / "queue.db"
        engine = store.make_engine(f"sqlite:///{db}")
        store.upgrade(engine)
        engine.dispose()
        champion, challenger = shadow_registry(ctx["bundle_dir"], Path(tmp) / "registry")
        base = ctx["user_config"]
        config = {
            **base,
            "bundle": "production",
            "registry": str(Path(tmp) / "registry"),
            "bundle_cache": str(Path(tmp) / "cache"),
            "store": {**base["store"], "db": str(db)},
            "monitoring": {**base["monitoring"], "profiles": str(Path(tmp) / "profiles")},
        }
        out: dict = {"load_avg_1m_before": round(os.getloadavg()[0], 2), "rate": rate}
        runs: dict[str, list] = {"off": [], "on": []}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            logging_config = {"encoding": "JSON", "enable_access_log": False}
            for i in range(2 * repeat):
                mode = ("off", "on")[i % 2]
                shadow = {**base["shadow"], "enabled": mode == "on", "sample": rate}
                service = IntentService.options(user_config={**config, "shadow": shadow})
                serve.run(
                    service.options(logging_config=logging_config).bind(), name="intentops", route_prefix="/"
                )
                time.sleep(SETTLE_S if i else 2 * SETTLE_S)  # reconfigured in place; the candidate loads
                rows_before = shadow_rows(db)
                runs[mode].append(asyncio.run(load(f"http://127.0.0.1:{port}/v1/predict", 32, n(2000), 40)))
                time.sleep(2 * base["shadow"]["flush_s"] + 0.5)  # the last scores reach the store
                runs[mode][-1]["shadow_rows"] = shadow_rows(db) - rows_before
        finally:
            serve.shutdown()
            ray.shutdown()
    out |= shadow_summary(runs["off"], runs["on"])
    out["shadow_rows_per_request_on"] = round(
        sum(r["shadow_rows"] for r in runs["on"]) / max(1, sum(r["requests"] for r in runs["on"])), 4
    )
    out["shadow_rows_off"] = sum(r["shadow_rows"] for r in runs["off"])
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return {"champion": champion, "challenger": challenger, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bundle",
        default=None,
        help="bundle folder, or `production` (default: production "
        "when models/registry/production exists, else the exported bundle, paths.bundle_dir)",
    )
    parser.add_argument("--variant", default=None, help="the bundle's graph to serve: fp32 (default) or int8")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    parser.add_argument("--repeat", type=int, default=1, help="complete runs; figures are their medians")
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy the replica under c32 load into this folder"
    )
    parser.add_argument(
        "--shadow",
        type=float,
        default=None,
        metavar="RATE",
        help="measure the shadow challenger at this sample rate instead: replica CPU/request at c32, shadow "
        "off vs on, --repeat times each",
    )
    parser.add_argument("overrides", nargs="*", help="serving user_config overrides, key=value")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from intentops.api import settings
    from intentops.config import load_params

    os.chdir(ROOT)  # the settings' relative paths (params.yaml, bundle, store) start at the project root
    params = load_params(ROOT / "params.yaml")
    defaults = OmegaConf.to_container(params.serving, resolve=True)
    # Serving loads ONNX bundles: without a production model, the `export` stage's bundle (models/bundle).
    bundle = args.bundle or (
        "production" if settings.registry_of(defaults, ROOT).production() else params.paths.bundle_dir
    )
    user_config = settings.merge_settings(
        {"bundle": bundle, **{k: v for k, v in defaults.items() if k != "bundle"}},
        parse_overrides(args.overrides),
    )
    if args.variant:
        user_config["variant"] = args.variant
    bundle_dir, _ = settings.resolve_bundle({**defaults, "bundle": bundle}, ROOT)
    # As serving/config.yaml deploys the API; set here, so Ray's processes run echo and live alike with it.
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    ctx = {"user_config": user_config, "bundle_dir": bundle_dir, "n": lambda k: max(1, int(k * args.scale))}
    if args.shadow is not None:
        print(json.dumps({"bundle": str(bundle_dir), "shadow": run_shadow(ctx, args.shadow, args.repeat)}))
        return
    runs = [run_once(ctx, args.profile if i == 0 else None) for i in range(args.repeat)]
    out = {
        "bundle": str(bundle_dir.relative_to(ROOT) if bundle_dir.is_relative_to(ROOT) else bundle_dir),
        "variant": user_config["variant"] or "fp32",
        **variant_accuracy(bundle_dir, user_config["variant"]),
        "num_threads": user_config["num_threads"],
        "raw_batch": user_config["batching"]["max_batch_size"],
        "batching": user_config["batching"],
        "ray_serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
        "repeat": args.repeat,
        **median_of(runs),
        "spread": {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in HEADLINE},
    }
    if args.profile:
        out["profile"] = {
            view: top_frames(args.profile / f"replica_c32{suffix}.txt")
            for view, suffix in (("all", ""), ("gil", "_gil"))
        }
        (args.profile / "top_frames.json").write_text(json.dumps(out["profile"], indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
