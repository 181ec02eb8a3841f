"""Load-test the intent API on loopback and print ONE JSON line: raw model, Serve overhead (echo), live endpoint.

    python benchmarks/serve_load.py [--bundle production|DIR] [--variant fp32|int8] [--scale 1.0] [key=value ...]

Starts everything itself (a local Ray with 2 CPUs, Serve on 127.0.0.1) and stops it; every level is
bounded by a request count and a time cap. Measures, on the same machine and bundle:
  raw   the Predictor in-process: batched throughput (sentences/s) and single-sentence latency
  echo  a no-op deployment behind the same Serve HTTP proxy and FastAPI layer, at concurrency 1 and 32
  live  the API (intentops.api.service) at concurrency 1, 8 and 32 (one text per request), then a list-of-texts client
ceiling_rps = 1 / (1/echo_c32_rps + 1/raw_sents_per_s): the rate if HTTP and the model shared the
CPU with no other loss. key=value pairs override serving user_config (e.g. batching.max_batch_size=16).
RAY_SERVE_* variables in the environment reach every Ray process, so they apply to echo and live alike; the
JSON line lists them (`ray_serve_env`). RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD defaults to 0, as
serving/config.yaml deploys it; set it to 1 to measure Serve's default.
`cpu_ms_per_req` splits the CPU time of each HTTP phase between Serve's proxy, the replica, Ray's daemons,
this client and everything else on the machine ("other": a loaded machine shows here), from /proc, so an
overhead can be located; `variant` and its test accuracy
(from the bundle's card) say which graph was served.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    """Batched sentences/s and single-sentence latency of the Predictor in this process."""
    from intentops.inference.predictor import Predictor

    predictor = Predictor.load(bundle, threads=num_threads, variant=variant)
    if predictor.meta.get("format") == "torch":  # the serving image has no torch: ONNX takes `threads`
        import torch

        torch.set_num_threads(num_threads)
    batch = [TEXTS[i % len(TEXTS)] for i in range(batch_size)]
    predictor.predict(batch, top_k=3)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(batch, top_k=3)
        n += batch_size
    sents_per_s = n / (time.perf_counter() - start)
    single = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 2 and len(single) < 300:
        t = time.perf_counter()
        predictor.predict([TEXTS[len(single) % len(TEXTS)]], top_k=3)
        single.append((time.perf_counter() - t) * 1000)
    return {"sents_per_s": sents_per_s, "single_ms": statistics.median(single)}


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

        start = time.perf_counter()
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
    parser.add_argument("overrides", nargs="*", help="serving user_config overrides, key=value")
    args = parser.parse_args()

    import ray
    from omegaconf import OmegaConf
    from ray import serve

    from intentops.api import schemas, settings
    from intentops.api.service import IntentService
    from intentops.config import load_params
    from intentops.feedback import store

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
    n = lambda k: max(1, int(k * args.scale))  # noqa: E731

    # The ceiling takes the better of 1 thread (what the replica uses) and every core (the model alone).
    raws = {
        t: measure_raw(bundle_dir, user_config["batching"]["max_batch_size"], t, user_config["variant"])
        for t in (1, os.cpu_count())
    }
    raw = {
        "sents_per_s": max(r["sents_per_s"] for r in raws.values()),
        "single_ms": min(r["single_ms"] for r in raws.values()),
    }

    out: dict = {
        "bundle": str(bundle_dir.relative_to(ROOT) if bundle_dir.is_relative_to(ROOT) else bundle_dir),
        "raw_sents_per_s": round(raw["sents_per_s"], 1),
        "raw_single_ms": round(raw["single_ms"], 2),
        "raw_batch": user_config["batching"]["max_batch_size"],
        "num_threads": user_config["num_threads"],
        "raw_by_threads": {t: round(r["sents_per_s"], 1) for t, r in raws.items()},
        "raw_single_ms_by_threads": {t: round(r["single_ms"], 2) for t, r in raws.items()},
        "variant": user_config["variant"] or "fp32",
        **variant_accuracy(bundle_dir, user_config["variant"]),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
        # Serve's own switches from the environment: Ray's processes inherit them, echo and live alike.
        "ray_serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="intentops-load-") as tmp:
        db = Path(tmp) / "queue.db"
        engine = store.make_engine(f"sqlite:///{db}")
        store.upgrade(engine)
        engine.dispose()
        user_config["store"]["db"] = str(db)
        user_config["monitoring"]["profiles"] = str(Path(tmp) / "profiles")
        # As serving/config.yaml deploys the API; set here, so Ray's processes run echo and live alike with it.
        os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
        out["ray_serve_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(echo_deployment(serve, schemas).bind(), name="echo", route_prefix="/echo")
            echo1 = asyncio.run(load(f"{base}/echo/v1/predict", 1, n(300), 30, warmup=20))
            echo32 = asyncio.run(load(f"{base}/echo/v1/predict", 32, n(1500), 30, warmup=20))
            serve.delete("echo")

            service = IntentService.options(
                user_config=user_config, logging_config={"encoding": "JSON", "enable_access_log": False}
            )
            serve.run(service.bind(), name="intentops", route_prefix="/")
            url = f"{base}/v1/predict"
            live = {
                c: asyncio.run(load(url, c, n(k), 40, warmup=20 if c == 1 else 0))
                for c, k in ((1, 200), (8, 600), (32, 1200))
            }
            batch = asyncio.run(load(url, 4, n(60), 40, texts_per_request=32))
        finally:
            serve.shutdown()
            ray.shutdown()

    ceiling = 1 / (1 / echo32["rps"] + 1 / raw["sents_per_s"])
    out |= {
        "echo_c1_rps": round(echo1["rps"], 1),
        "echo_c1_p50_ms": round(echo1["p50_ms"], 2),
        "echo_c32_rps": round(echo32["rps"], 1),
        "echo_c32_p50_ms": round(echo32["p50_ms"], 2),
    }
    for c, r in live.items():
        out |= {
            f"c{c}_rps": round(r["rps"], 1),
            f"c{c}_p50_ms": round(r["p50_ms"], 2),
            f"c{c}_p95_ms": round(r["p95_ms"], 2),
            f"c{c}_p99_ms": round(r["p99_ms"], 2),
        }
    out |= {
        "list32_c4_texts_per_s": round(batch["texts_per_s"], 1),
        "list32_c4_p50_ms": round(batch["p50_ms"], 2),
        "ceiling_rps": round(ceiling, 1),
        "ratio_c32_vs_ceiling": round(live[32]["rps"] / ceiling, 3),
        "c1_p50_budget_ms": round(echo1["p50_ms"] + raw["single_ms"] + 5, 2),
        "list32_vs_raw": round(batch["texts_per_s"] / raw["sents_per_s"], 3),
        "errors": sum(r["errors"] for r in (echo1, echo32, batch, *live.values())),
        "batching": user_config["batching"],
        "cpu_ms_per_req": {
            "echo_c32": echo32["cpu_ms_per_req"],
            "c32": live[32]["cpu_ms_per_req"],
            "c1": live[1]["cpu_ms_per_req"],
            "echo_c1": echo1["cpu_ms_per_req"],
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
