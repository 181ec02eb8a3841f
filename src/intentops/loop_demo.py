"""`make loop-demo`: the closed loop end to end, in a temporary DVC project, on the real pipeline.

1. Train with K intents held out of train and val (`split.holdout_intents`; test keeps them, so they count
   as errors).
2. Serve that model with Ray Serve on 127.0.0.1 (an API key per client, an audit sample, shadow scoring on)
   and replay in-distribution traffic over HTTP: windows of held-in test rows. `intentops drift-check`
   estimates each window's accuracy from the calibrated confidences and should stay quiet.
3. Replay shifted traffic: windows where a share of the rows are utterances of the held-out intents (their
   test rows and dataset utterances training never saw, the "pool"). `intentops drift-check` must flag it.
4. Label the queue: an API client corrects part of the held-out items through POST /v1/feedback; three scripted
   annotators answer the rest, and the audit sample, through `intentops label`.
5. Per window: the estimated accuracy (with its interval), the labelled accuracy of the audit sample, and
   the actual accuracy (the demo knows the truth).
6. `intentops drift-check --retrain`: export (API corrections included), `dvc repro`, gate; the challenger
   is staged as the registry's candidate.
7. The app scores the candidate in shadow on replayed traffic; `intentops shadow report` gives the agreement,
   then `intentops registry promote` moves production (reading the shadow figures) and the app hot-swaps.
8. Replay the test utterances again.

Then a model trained on all intents (the oracle) is built in a second project sharing the DVC cache.
Progress goes to stdout; the LAST line is JSON: acc_before, acc_after, acc_oracle, loop_seconds,
estimate_max_error_in_distribution, estimated_drop_shifted, actual_drop_shifted, shadow_agreement,
api_corrections_exported, ..."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intentops.config import API_KEY_ENV
from intentops.errors import UserError, cli_entry
from intentops.io import read_json
from intentops.monitor.drift import DRIFT_EXIT_CODE, PERFORMANCE_EXIT_CODE
from intentops.monitor.retrain import stages_run
from intentops.scratch import create_project, tool_env, write_project_params

ANNOTATORS = ("ann", "bob", "cy")
DEMO_CLIENT = "desk"  # the API client (an agent desk) that sends corrections through POST /v1/feedback
ORACLE_STEP = "oracle: all intents, same pipeline, shared DVC cache"


@dataclass
class LoopConfig:
    """Knobs of the demo.

    Args:
        k: how many intents to hold out (chosen with `seed` among the taxonomy's labels), unless `holdout` names them.
        per_intent: at most this many queue items labelled per held-out intent.
        pool_per_intent: unseen utterances of each held-out intent replayed next to the test split.
        overrides: Hydra overrides for both projects (the fixture's sha256 pins in tests, say).
        window_rows: rows per profile window (monitor.profiles.window_max_rows) in the demo projects.
        cache_dir: DVC cache shared by the loop and oracle projects (default: a fresh one under the work dir).
        min_new_labels: monitor.retrain.min_new_labels in the demo projects unless `overrides` set it: only
            needs_review items reach the queue, so K intents may yield fewer than K * per_intent labels.
        in_windows: in-distribution windows replayed first (held-in test rows only).
        shifted_windows: shifted windows replayed next; `shifted_share` of their rows are utterances of the
            held-out intents (the pool and their test rows, cycled when there are too few: the fixture).
        api_share: of the labelled held-out items, this share is corrected through POST /v1/feedback (one
            API client's vote), the rest by three annotators through `intentops label`.
        audit_share: serving.store.audit_share of the demo app (random texts kept for audit labelling).
        shadow_sample: serving.shadow.sample of the demo app (the staged challenger scores this share).
    """

    k: int = 5
    seed: int = 0
    holdout: list[str] = field(default_factory=list)
    per_intent: int = 20
    pool_per_intent: int = 120
    overrides: list[str] = field(default_factory=list)
    window_rows: int = 1000
    cache_dir: str | None = None
    oracle: bool = True
    min_new_labels: int = 25
    in_windows: int = 2
    shifted_windows: int = 2
    shifted_share: float = 0.4
    api_share: float = 0.5
    audit_share: float = 0.05
    shadow_sample: float = 0.25


class Progress:
    """Timestamped progress lines on stdout."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        print(f"[loop-demo {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    @contextmanager
    def step(self, name: str):
        self(f"== {name}")
        t = time.perf_counter()
        yield
        self.marks[name] = round(time.perf_counter() - t, 1)
        self(f"   {name}: {self.marks[name]} s")


def _env(mirror: str | None) -> dict[str, str]:
    """The environment the demo's commands run with: the venv's tools, W&B offline, the projects' own queue."""
    from intentops.config import PARAMS_ENV
    from intentops.data.sources import MIRROR_ENV
    from intentops.feedback.store import DB_URL_ENV

    env = tool_env({"WANDB_MODE": "offline"})
    env.pop(PARAMS_ENV, None)  # each demo project reads its own params.yaml
    env.pop(DB_URL_ENV, None)  # the demo's queue is the project's own SQLite file
    if mirror:
        # The demo projects live in a temp dir: a relative local mirror (../shared/datasets) must not move with them.
        env[MIRROR_ENV] = mirror if "://" in mirror else str(Path(mirror).resolve())
    return env


def _run(
    cmd: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    log: Callable[[str], None] | None = None,
    ok: Sequence[int] = (0,),
) -> tuple[int, str]:
    """Run a command, echo its interesting lines through `log`, return (exit code, output)."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        s = line.rstrip()
        if log and (
            s.startswith(
                ("Running stage", "Stage ", "retrain ", "drift", "serving at", "error", "  where:", "  fix:")
            )
            or "INFO __main__" in s
        ):
            log(f"   | {s[:220]}")
    code = proc.wait()
    out = "".join(lines)
    if code not in ok:
        raise UserError(
            f"`{' '.join(cmd)}` exited {code}:\n{out[-3000:]}",
            where=str(cwd),
            fix="read the output above; the project is kept for inspection with --keep",
        )
    return code, out


def choose_holdout(labels: Sequence[str], k: int, seed: int) -> list[str]:
    """K labels picked with `seed` (sorted, so the choice does not depend on the taxonomy's order)."""
    if not 0 < k < len(labels):
        raise UserError(
            f"cannot hold out {k} of {len(labels)} intents", where="--k", fix=f"use 1..{len(labels) - 1}"
        )
    return sorted(random.Random(seed).sample(sorted(labels), k))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_project(project: Path, log: Callable[[str], None], cfg: LoopConfig, env: dict[str, str]):
    """Ray (2 CPUs) + Serve on 127.0.0.1, the project's app serving its production model (the staged candidate
    in shadow, an audit sample kept, the demo's API key required); yields the base URL."""
    import httpx
    import ray
    from ray import serve

    from intentops.api.service import IntentService
    from intentops.api.settings import ROOT_ENV

    port = free_port()
    user_config = {
        "watch_interval_s": 1.0,
        "monitoring": {"flush_s": 1.0},
        "store": {"audit_share": cfg.audit_share},
        "shadow": {"enabled": True, "sample": cfg.shadow_sample},
    }
    env_vars = {ROOT_ENV: str(project), "WHYLOGS_NO_ANALYTICS": "True", API_KEY_ENV: env[API_KEY_ENV]}
    with contextlib.chdir(project):  # Ray's job (and the replicas' relative paths) start in the project
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            service = IntentService.options(
                user_config=user_config,
                ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env_vars}},
                logging_config={"encoding": "JSON", "enable_access_log": False},
            )
            serve.run(service.bind(), name="intentops", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            version = httpx.get(f"{url}/readyz", timeout=30).json().get("model_version")
            log(f"serving {version} at {url}")
            yield url
        finally:
            serve.shutdown()
            ray.shutdown()


def replay(
    url: str, texts: Sequence[str], batch: int = 16, workers: int = 4, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """POST the texts to /v1/predict in batches from a few concurrent clients; predictions in input order."""
    import httpx

    chunks = [list(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:

        def post(chunk: list[str]) -> list[dict[str, Any]]:
            r = client.post("/v1/predict", json={"texts": chunk})
            r.raise_for_status()
            return r.json()["predictions"]

        with ThreadPoolExecutor(workers) as pool:
            return [p for preds in pool.map(post, chunks) for p in preds]


def wait_for_windows(profiles: Path, n: int, timeout_s: float = 120.0) -> int:
    """Wait until at least `n` closed profile windows exist (the app profiles off the request path)."""
    from intentops.monitor.profiles import list_windows

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        have = len(list_windows(str(profiles))) if profiles.is_dir() else 0
        if have >= n:
            return have
        time.sleep(0.5)
    raise UserError(
        f"only {have} of {n} profile windows were written within {timeout_s:.0f} s",
        where=str(profiles),
        fix="check the replica log for 'profile window write failed'",
    )


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def choose_items(
    items: list[dict], gold: dict[str, str], unseen: set[str], per_intent: int
) -> dict[str, str]:
    """prediction_id -> gold label of the queue items the demo's labellers answer: every item of the random
    audit sample, and at most `per_intent` needs_review items per held-out intent whose text training never
    saw (`unseen`: the pool; a test text would be dropped from train by `split`). A text is labelled once."""
    taken: Counter = Counter()
    done: set[str] = set()
    chosen = {}
    for item in items:
        text = item["text"]
        label = gold.get(text)
        if label is None or text in done:
            continue
        audit = bool(item.get("audit"))  # the random sample, flagged (needs_review) texts included
        if audit or (text in unseen and taken[label] < per_intent):
            taken[label] += not audit
            done.add(text)
            chosen[item["prediction_id"]] = label
    return chosen


def api_corrections(url: str, headers: dict[str, str], corrections: dict[str, str]) -> int:
    """POST /v1/feedback for each prediction id -> label, as the API client whose key is in `headers`."""
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        for pid, label in corrections.items():
            r = client.post("/v1/feedback", json={"prediction_id": pid, "label": label})
            r.raise_for_status()
    return len(corrections)


def scripted_annotation(demo: Demo, project: Path, url: str, gold: dict[str, str], unseen: set[str]) -> dict:
    """Label the queue: `api_share` of the held-out items are corrected through POST /v1/feedback by an API
    client, the other items (and the audit sample) answered by three annotators through `intentops label`."""
    from intentops.config import load_params
    from intentops.feedback import store
    from intentops.feedback.label import main_label

    with contextlib.chdir(project):
        params = load_params()
        engine = store.engine_from_params(params)
        try:
            items = store.queue_items(engine)
        finally:
            engine.dispose()
        chosen = choose_items(items, gold, unseen, demo.cfg.per_intent)
        audit = {i["prediction_id"] for i in items if i.get("audit")}
        held_items = [pid for pid in chosen if pid not in audit]
        share = (
            demo.cfg.api_share
        )  # spread over the intents: item k goes through the API when k*share crosses 1
        by_api = {pid for k, pid in enumerate(held_items) if int((k + 1) * share) > int(k * share)}
        sent = api_corrections(url, demo.headers, {pid: chosen[pid] for pid in by_api})
        # One API vote resolves an item (feedback.label.api_votes): the sessions below no longer show those.
        answers = [chosen.get(i["prediction_id"], "skip") for i in items if i["prediction_id"] not in by_api]
        out = io.StringIO()
        for name in ANNOTATORS:  # each session shows the same pending items in queue order
            main_label(params, name, stdin=io.StringIO("\n".join(answers) + "\n"), stdout=out)
    kappa = [line for line in out.getvalue().splitlines() if line.startswith("mean pairwise kappa")]
    labelled = Counter(label for pid, label in chosen.items() if pid not in audit)
    return {
        "queue_items": len(items),
        "labelled_per_intent": dict(labelled),
        "audit_items_labelled": len(audit & set(chosen)),
        "api_corrections_sent": sent,
        "kappa_line": kappa[-1] if kappa else None,
    }


@dataclass
class Demo:
    """What every step of one run shares: its config, where it runs, and how it reports."""

    cfg: LoopConfig
    root: Path
    work: Path
    env: dict[str, str]
    log: Progress
    cache_dir: Path = field(init=False)
    base: list[str] = field(init=False)
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        import secrets

        self.cache_dir = Path(self.cfg.cache_dir or self.work / "dvc-cache").resolve()
        # The demo app requires an API key; its one client, the agent desk, sends the corrections.
        key = secrets.token_hex(16)
        self.env[API_KEY_ENV] = f"{DEMO_CLIENT}={key}"
        self.headers = {"X-API-Key": key}
        # Overrides of both projects; min_new_labels only when the caller's overrides leave it alone.
        self.base = [*self.cfg.overrides, f"monitor.profiles.window_max_rows={self.cfg.window_rows}"]
        if not any(o.startswith("monitor.retrain.min_new_labels=") for o in self.cfg.overrides):
            self.base.append(f"monitor.retrain.min_new_labels={self.cfg.min_new_labels}")

    def project(self, name: str) -> tuple[Path, Any]:
        """A scratch project `name` under the work dir with the base overrides; (its root, its params.paths)."""
        from intentops.config import load_params

        project = create_project(
            self.work / name, self.base, root=self.root, cache_dir=self.cache_dir, env=self.env
        )
        return project, load_params(project / "params.yaml").paths

    def run(self, project: Path, *cmd: str, ok: Sequence[int] = (0,)) -> tuple[int, str]:
        """Run a command in `project`, its interesting lines logged."""
        return _run(cmd, project, self.env, self.log, ok=ok)


def train_with_holdout(demo: Demo) -> tuple[Path, Any, list[str], dict[str, Any]]:
    """Step 1: the loop project, trained by `dvc repro` with K intents held out; (project, paths, held, result)."""
    from intentops.data.taxonomy import Taxonomy

    project, paths = demo.project("loop")
    demo.run(project, "dvc", "repro", "validate")
    cfg = demo.cfg
    held = sorted(cfg.holdout) or choose_holdout(
        Taxonomy.read(project / paths.taxonomy).labels, cfg.k, cfg.seed
    )
    demo.log(f"holding out {len(held)} intent(s): {held}")
    write_project_params(project, [*demo.base, f"split.holdout_intents=[{','.join(held)}]"])
    _, out = demo.run(project, "dvc", "repro")
    _run(["intentops", "db", "upgrade"], project, demo.env)
    return project, paths, held, {"before_stages": stages_run(out)}


def cycled(df, n: int):
    """The first `n` rows of `df` repeated as often as needed (a small fixture has too few)."""
    import numpy as np

    return df.iloc[np.arange(n) % len(df)]


def traffic_phases(project: Path, paths: Any, held: Sequence[str], cfg: LoopConfig):
    """(test split, in-distribution traffic, shifted traffic), each with text and label.

    In-distribution: cfg.in_windows windows of held-in test rows. Shifted: cfg.shifted_windows windows, a
    `shifted_share` of them utterances of the held-out intents (their test rows plus, per intent, at most
    cfg.pool_per_intent dataset utterances from outside the test split: training never saw them), the rest
    the held-in test rows not sent yet, then again. Every test text is sent once at least (acc_before).
    """
    import pandas as pd

    test = pd.read_parquet(project / paths.test)[["text", "label"]]
    canonical = pd.read_parquet(project / paths.canonical)
    test_keys = set(test["text"].str.casefold())
    unseen = canonical[
        canonical["label"].isin(held)
        & (canonical["origin_split"] != "test")
        & ~canonical["text"].str.casefold().isin(test_keys)
    ].drop_duplicates("text")
    pool = unseen.sample(frac=1, random_state=cfg.seed).groupby("label").head(cfg.pool_per_intent)
    held_in = test[~test["label"].isin(held)].sample(frac=1, random_state=cfg.seed)
    n_in, n_shift = cfg.in_windows * cfg.window_rows, cfg.shifted_windows * cfg.window_rows
    in_dist = cycled(held_in, n_in)
    n_unseen = round(cfg.shifted_share * n_shift)
    unseen_rows = cycled(pd.concat([test[test["label"].isin(held)], pool[["text", "label"]]]), n_unseen)
    offset = n_in % len(held_in)
    rest = pd.concat([held_in.iloc[offset:], held_in.iloc[:offset]])
    shifted = pd.concat([unseen_rows, cycled(rest, n_shift - n_unseen)]).sample(frac=1, random_state=cfg.seed)
    return test, in_dist, shifted


def window_accuracy(preds: Sequence[dict], gold: Sequence[str], window_rows: int) -> list[float]:
    """Actual accuracy of each full window of `window_rows` consecutive predictions (sent in order)."""
    hits = [p["intent"] == g for p, g in zip(preds, gold, strict=True)]
    return [
        sum(hits[i : i + window_rows]) / window_rows
        for i in range(0, len(hits) - window_rows + 1, window_rows)
    ]


def replay_phase(demo: Demo, url: str, traffic, profiles: Path, windows_before: int) -> dict[str, Any]:
    """Replay one phase in order (one client: window k holds exactly rows k*W..(k+1)*W); its windows' accuracy."""
    preds = replay(url, traffic["text"].tolist(), workers=1, headers=demo.headers)
    actual = window_accuracy(preds, traffic["label"].tolist(), demo.cfg.window_rows)
    wait_for_windows(profiles, windows_before + len(actual))
    return {"preds": preds, "actual": actual}


def check_drift(demo: Demo, project: Path, paths: Any, windows: int, expect_trigger: bool) -> dict[str, Any]:
    """`intentops drift-check` over the last `windows` windows; the shifted ones must trigger it."""
    triggers = (DRIFT_EXIT_CODE, PERFORMANCE_EXIT_CODE)
    code, _ = demo.run(project, "intentops", "drift-check", "--last-n", str(windows), ok=(0, *triggers))
    report = read_json(project / paths.drift_report)
    result = {
        "exit_code": code,
        "drifted_features": report["drifted_features"],
        "estimated_drop": (report.get("performance") or {}).get("drop"),
    }
    demo.log(f"drift-check over {windows} window(s): exit {code}; {result}")
    if expect_trigger and code not in triggers:
        raise UserError(
            "drift-check found neither drift nor an accuracy drop in the shifted traffic",
            where=str(project / paths.drift_html),
            fix="hold out more intents (--k) or check the thresholds in conf/monitor/default.yaml",
        )
    return result


def window_table(demo: Demo, project: Path, paths: Any, actual: list[float]) -> dict[str, Any]:
    """Estimated, labelled (audit sample) and actual accuracy of every replayed window, from one drift-check."""
    n = len(actual)
    ok = (0, DRIFT_EXIT_CODE, PERFORMANCE_EXIT_CODE)
    demo.run(project, "intentops", "drift-check", "--last-n", str(n), ok=ok)
    perf = read_json(project / paths.drift_report)["performance"]
    rows = []
    for i, (w, acc) in enumerate(zip(perf["windows"][-n:], actual, strict=True)):
        labelled = w.get("labelled") or {}
        rows.append(
            {
                "window": i + 1,
                "phase": "in-distribution" if i < demo.cfg.in_windows else "shifted",
                "estimated": round(w["estimated_accuracy"], 4),
                "low": round(w["low"], 4),
                "high": round(w["high"], 4),
                "labelled": labelled.get("accuracy"),
                "labelled_n": labelled.get("n", 0),
                "actual": round(acc, 4),
            }
        )
    for r in rows:
        shown = "  -  " if r["labelled"] is None else f"{r['labelled']:.3f} (n={r['labelled_n']})"
        demo.log(
            f"window {r['window']} {r['phase']:>15}: estimated {r['estimated']:.3f} "
            f"[{r['low']:.3f}, {r['high']:.3f}], labelled {shown}, actual {r['actual']:.3f}"
        )
    # Kept aside: the retrain's drift-check (step 6) rewrites the project's report over the shifted windows only.
    keep = demo.work / "windows-report"
    keep.mkdir(parents=True, exist_ok=True)
    for src in (paths.performance_plot, paths.drift_html, paths.drift_plot):
        shutil.copy2(project / src, keep / Path(src).name)
    return {
        "windows": rows,
        "performance_plot": str(keep / Path(paths.performance_plot).name),
        "drift_report": str(keep / Path(paths.drift_html).name),
        "drift_plot": str(keep / Path(paths.drift_plot).name),
    }


def estimate_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The demo's figures: the largest in-distribution error, and estimated vs actual drop on the shifted windows."""
    inside = [r for r in rows if r["phase"] == "in-distribution"]
    shifted = [r for r in rows if r["phase"] == "shifted"]

    def mean(key: str, rs: list[dict]) -> float:
        return sum(r[key] for r in rs) / len(rs)

    return {
        "estimate_max_error_in_distribution": round(
            max(abs(r["estimated"] - r["actual"]) for r in inside), 4
        ),
        "actual_inside_interval_in_distribution": all(r["low"] <= r["actual"] <= r["high"] for r in inside),
        "estimated_drop_shifted": round(mean("estimated", inside) - mean("estimated", shifted), 4),
        "actual_drop_shifted": round(mean("actual", inside) - mean("actual", shifted), 4),
    }


def retrain_to_candidate(demo: Demo, project: Path, paths: Any, windows: int) -> dict[str, Any]:
    """`intentops drift-check --retrain` with the challenger staged as the registry's candidate (production
    moves later, after the shadow run); what its report says of the retrain."""
    from intentops.stages.promote import TARGET_ENV

    env = {**demo.env, TARGET_ENV: "candidate"}
    _run(["intentops", "drift-check", "--last-n", str(windows), "--retrain"], project, env, demo.log)
    retrain = read_json(project / paths.drift_report)["retrain"]
    keys = ("new_labels", "exported_rows", "repro_seconds", "production_before")
    summary = {k: retrain.get(k) for k in keys}
    summary["candidate"] = retrain["gate"].get("challenger")
    summary["gate_reasons"] = retrain["gate"].get("reasons")
    return {"retrain": summary, "after_stages": retrain.get("stages")}


def shadow_figures(demo: Demo, project: Path, url: str, texts: list[str], timeout_s: float = 90.0) -> dict:
    """Replay `texts` until the app's challenger has scored some, then `intentops shadow report`'s figures.

    The app loads the staged candidate on its next registry poll, off the request path: traffic replayed before
    that is answered by the champion alone (CI of the #19 change: 0 shadow rows on a busy 2-core machine).
    """
    t0 = time.perf_counter()
    while True:
        replay(url, texts, headers=demo.headers)
        time.sleep(3.0)  # the shadow rows are written off the request path
        _, out = demo.run(project, "intentops", "shadow", "report")
        shadow = json.loads(out[out.index("{") :])
        if shadow.get("rows") or time.perf_counter() - t0 > timeout_s:
            return shadow
        demo.log("shadow: no rows yet (the challenger is still loading); replaying again")


def shadow_then_promote(demo: Demo, project: Path, paths: Any, url: str, traffic) -> dict[str, Any]:
    """Replay shifted traffic with the candidate scoring in shadow, read the shadow figures, then move
    production (`intentops registry promote`, which reads them) and wait for the app to swap."""
    from intentops.monitor.retrain import wait_for_swap

    shadow = shadow_figures(demo, project, url, traffic["text"].tolist())
    demo.log(
        f"shadow: {shadow.get('rows')} rows, agreement {shadow.get('agreement')} "
        f"(champion {shadow.get('champion')}, challenger {shadow.get('challenger')})"
    )
    demo.run(project, "intentops", "registry", "promote", "--gate", str(paths.promote_gate))
    after = shadow.get("challenger")
    swap_s = wait_for_swap(url, after, 300.0, api_key=demo.headers["X-API-Key"])
    demo.log(f"production -> {after}; the app swapped in {swap_s:.1f} s")
    return {"shadow": shadow, "shadow_agreement": shadow.get("agreement"), "swap_seconds": round(swap_s, 1)}


def replay_test(demo: Demo, url: str, test, held: Sequence[str]) -> dict[str, Any]:
    """Replay the test split again; accuracy after, overall and on the held-out intents."""
    preds = replay(url, test["text"].tolist(), headers=demo.headers)
    mask = test["label"].isin(held).to_numpy()
    result = {
        "acc_after": accuracy([p["intent"] for p in preds], test["label"].tolist()),
        "acc_after_heldout": accuracy(
            [p["intent"] for p, m in zip(preds, mask, strict=True) if m], test.loc[mask, "label"].tolist()
        ),
        "model_after": preds[0]["model_version"],
    }
    demo.log(f"acc_after {result['acc_after']:.4f} from {result['model_after']}")
    return result


def build_oracle(demo: Demo, test) -> dict[str, Any]:
    """The oracle: a second project (shared DVC cache) trained on all intents; its accuracy on the same test."""
    from intentops.inference.predictor import Predictor

    oracle, paths = demo.project("oracle")
    _, out = demo.run(oracle, "dvc", "repro", "export")
    predicted = [
        p["intent"] for p in Predictor.load(oracle / paths.bundle_dir).predict(test["text"].tolist())
    ]
    return {"oracle_stages": stages_run(out), "acc_oracle": accuracy(predicted, test["label"].tolist())}


def run_loop(
    work: Path, cfg: LoopConfig, mirror: str | None, root: Path, log: Progress | None = None
) -> dict[str, Any]:
    """Run the loop (and the oracle) under `work`; returns the result record."""
    from intentops.monitor.profiles import list_windows

    demo = Demo(cfg, root, work, _env(mirror), log or Progress())
    t_loop = time.perf_counter()
    with demo.log.step("1. train with intents held out"):
        project, paths, held, result = train_with_holdout(demo)
    test, in_dist, shifted = traffic_phases(project, paths, held, cfg)
    profiles = project / paths.monitoring_profiles
    with serve_project(project, demo.log, cfg, demo.env) as url:
        with demo.log.step("2. in-distribution traffic, then drift-check"):
            first = replay_phase(demo, url, in_dist, profiles, 0)
            result["drift_in_distribution"] = check_drift(demo, project, paths, cfg.in_windows, False)
        with demo.log.step("3. shifted traffic, then drift-check"):
            second = replay_phase(demo, url, shifted, profiles, cfg.in_windows)
            result["drift_shifted"] = check_drift(demo, project, paths, cfg.shifted_windows, True)
        result.update(before_accuracy(first, second, in_dist, shifted, test, held))
        with demo.log.step("4. corrections through the API, annotators through `intentops label`"):
            gold = dict(zip(shifted["text"], shifted["label"], strict=True)) | dict(
                zip(test["text"], test["label"], strict=True)
            )
            unseen = set(shifted["text"]) - set(test["text"])
            result["annotation"] = scripted_annotation(demo, project, url, gold, unseen)
            demo.log(f"{result['annotation']}")
        with demo.log.step("5. estimated, labelled and actual accuracy per window"):
            table = window_table(demo, project, paths, first["actual"] + second["actual"])
            result.update(table, **estimate_summary(table["windows"]))
        with demo.log.step("6. drift-check --retrain: export, dvc repro, gate, challenger staged"):
            result.update(retrain_to_candidate(demo, project, paths, cfg.shifted_windows))
            result["api_corrections"] = exported_api_corrections(project)
            result["api_corrections_exported"] = result["api_corrections"]["exported"]
        with demo.log.step("7. shadow run of the candidate, then promotion and hot swap"):
            result.update(shadow_then_promote(demo, project, paths, url, shifted.iloc[: cfg.window_rows]))
        with demo.log.step("8. replay the test traffic again"):
            result.update(replay_test(demo, url, test, held))
    result["loop_seconds"] = round(time.perf_counter() - t_loop, 1)
    result["profile_windows"] = len(list_windows(str(profiles)))
    if cfg.oracle:
        with demo.log.step(ORACLE_STEP):
            result.update(build_oracle(demo, test))
        result["oracle_seconds"] = demo.log.marks[ORACLE_STEP]
    result.update(held_out=held, k=len(held), per_intent=cfg.per_intent, steps_seconds=dict(demo.log.marks))
    return result


def before_accuracy(first: dict, second: dict, in_dist, shifted, test, held: Sequence[str]) -> dict[str, Any]:
    """Accuracy of the first model on the test split (every test text was sent in one of the two phases)."""
    by_text = {}
    for phase, traffic in ((first, in_dist), (second, shifted)):
        by_text.update({t: p for t, p in zip(traffic["text"], phase["preds"], strict=True)})
    held_test = test.loc[test["label"].isin(held)]
    preds = first["preds"] + second["preds"]
    return {
        "acc_before": accuracy([by_text[t]["intent"] for t in test["text"]], test["label"].tolist()),
        "acc_before_heldout": accuracy(
            [by_text[t]["intent"] for t in held_test["text"]], held_test["label"].tolist()
        ),
        "model_before": preds[0]["model_version"],
        "needs_review_share": round(sum(p["needs_review"] for p in preds) / len(preds), 4),
    }


def exported_api_corrections(project: Path) -> dict[str, int]:
    """The project's /v1/feedback corrections, and how many reached labels.csv (intentops.feedback.audit)."""
    from intentops.config import load_params
    from intentops.feedback.audit import api_corrections

    with contextlib.chdir(project):
        return api_corrections(load_params())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m intentops.loop_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--k", type=int, default=LoopConfig.k, help="intents held out (default %(default)s)")
    p.add_argument("--holdout", nargs="*", default=[], help="name the held-out intents instead of drawing K")
    p.add_argument("--seed", type=int, default=LoopConfig.seed)
    p.add_argument(
        "--per-intent", type=int, default=LoopConfig.per_intent, help="labels per held-out intent (<= 20)"
    )
    p.add_argument("--pool-per-intent", type=int, default=LoopConfig.pool_per_intent)
    p.add_argument("--in-windows", type=int, default=LoopConfig.in_windows, help="in-distribution windows")
    p.add_argument("--shifted-windows", type=int, default=LoopConfig.shifted_windows, help="shifted windows")
    p.add_argument("--window-rows", type=int, default=LoopConfig.window_rows)
    p.add_argument("--workdir", help="where the temporary projects go (default: a new temp folder)")
    p.add_argument("--cache-dir", help="DVC cache for both projects (default: a fresh one in the work dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (always kept on failure)")
    p.add_argument("--no-oracle", action="store_true", help="skip the all-intents model")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides for both projects, e.g. export.quantize=false"
    )
    return p


def keep_reports(result: dict[str, Any], keep_dir: Path) -> None:
    """Copy the drift report and figure, and write result.json, to `keep_dir` (they outlive the temp projects)."""
    keep_dir.mkdir(parents=True, exist_ok=True)
    for key in ("drift_report", "drift_plot", "performance_plot"):
        src = Path(result[key])
        shutil.copy2(src, keep_dir / src.name)
        result[key] = str((keep_dir / src.name).resolve())
    (keep_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    from intentops.config import load_params, repo_root
    from intentops.data.sources import MIRROR_ENV

    args = build_parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per replayed request
    cfg = LoopConfig(
        k=args.k,
        seed=args.seed,
        holdout=args.holdout,
        per_intent=args.per_intent,
        pool_per_intent=args.pool_per_intent,
        overrides=args.overrides,
        window_rows=args.window_rows,
        cache_dir=args.cache_dir,
        oracle=not args.no_oracle,
        in_windows=args.in_windows,
        shifted_windows=args.shifted_windows,
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="intentops-loop-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = Progress()
    log(f"work dir {work}; K={cfg.k}, per_intent={cfg.per_intent}, overrides={cfg.overrides}")
    root = repo_root()
    result = run_loop(work, cfg, os.environ.get(MIRROR_ENV), root, log)
    if cfg.oracle:
        result["gap_to_oracle"] = round(result["acc_oracle"] - result["acc_after"], 4)
    keep_reports(result, root / load_params(root / "params.yaml").paths.loop_demo_dir)
    print(f"drift report: {result['drift_report']} (figure {result['drift_plot']})", flush=True)
    print(json.dumps(result, default=str), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
