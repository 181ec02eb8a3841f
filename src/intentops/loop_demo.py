"""`make loop-demo`: the closed loop end to end, in a temporary DVC project, on the real pipeline.

1. Train with K intents held out of train and val (`split.holdout_intents`; test keeps them, so they count
   as errors).
2. Serve that model with Ray Serve on 127.0.0.1.
3. Replay shifted traffic over HTTP: the test utterances plus, for each held-out intent, dataset utterances
   of it that training never saw (the "pool"; never test texts, so nothing of test leaks into training).
4. `intentops drift-check` flags drift (exit 10).
5. Scripted annotators label at most `per_intent` review-queue items per held-out intent with the gold label,
   through `intentops label` (three annotators, as the guidelines ask).
6. `intentops drift-check --retrain --serve-url ...`: export, `dvc repro`, gate, promotion, hot swap.
7. Replay the test utterances again.

Then a model trained on all intents (the oracle) is built in a second project sharing the DVC cache.
Progress goes to stdout; the LAST line is JSON: acc_before, acc_after, acc_oracle, loop_seconds, ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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

from intentops.errors import UserError, cli_entry
from intentops.io import read_json
from intentops.monitor.retrain import stages_run
from intentops.scratch import create_project, tool_env, write_project_params

ANNOTATORS = ("ann", "bob", "cy")
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
        replay_repeats: the shifted traffic is sent this many times (a tiny fixture needs volume for the tests
            to reach significance; accuracy is read from the first pass).
    """

    k: int = 5
    seed: int = 0
    holdout: list[str] = field(default_factory=list)
    per_intent: int = 20
    pool_per_intent: int = 120
    overrides: list[str] = field(default_factory=list)
    window_rows: int = 500
    cache_dir: str | None = None
    oracle: bool = True
    replay_repeats: int = 1
    min_new_labels: int = 25


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
def serve_project(project: Path, log: Callable[[str], None]):
    """Ray (2 CPUs) + Serve on 127.0.0.1, the project's app serving its production model; yields the base URL."""
    import httpx
    import ray
    from ray import serve

    from intentops.api.service import IntentService
    from intentops.api.settings import ROOT_ENV

    port = free_port()
    with contextlib.chdir(project):  # Ray's job (and the replicas' relative paths) start in the project
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            service = IntentService.options(
                user_config={"watch_interval_s": 1.0, "monitoring": {"flush_s": 1.0}},
                ray_actor_options={
                    "num_cpus": 1,
                    "runtime_env": {"env_vars": {ROOT_ENV: str(project), "WHYLOGS_NO_ANALYTICS": "True"}},
                },
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


def replay(url: str, texts: Sequence[str], batch: int = 16, workers: int = 4) -> list[dict[str, Any]]:
    """POST the texts to /v1/predict in batches from a few concurrent clients; predictions in input order."""
    import httpx

    chunks = [list(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    with httpx.Client(base_url=url, timeout=120) as client:

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


def scripted_annotation(project: Path, gold: dict[str, str], per_intent: int) -> dict[str, Any]:
    """Three annotators answer, through `intentops label`, the gold label of at most `per_intent` queue items
    per held-out intent (items whose text is in `gold`) and skip the rest."""
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
        taken: Counter = Counter()
        done: set[str] = set()  # a text sent twice is queued twice; label it once
        answers = []
        for item in items:
            label = gold.get(item["text"])
            if label is not None and taken[label] < per_intent and item["text"] not in done:
                taken[label] += 1
                done.add(item["text"])
                answers.append(label)
            else:
                answers.append("skip")
        out = io.StringIO()
        for name in ANNOTATORS:  # each session shows the same pending items in queue order
            main_label(params, name, stdin=io.StringIO("\n".join(answers) + "\n"), stdout=out)
    kappa = [line for line in out.getvalue().splitlines() if line.startswith("mean pairwise kappa")]
    return {
        "queue_items": len(items),
        "labelled_per_intent": dict(taken),
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

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cfg.cache_dir or self.work / "dvc-cache").resolve()
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


def shifted_traffic(project: Path, paths: Any, held: Sequence[str], cfg: LoopConfig):
    """(test split, pool): the pool holds, per held-out intent, at most cfg.pool_per_intent of its dataset
    utterances from outside the test split (training never saw them: the intent was held out)."""
    import pandas as pd

    test = pd.read_parquet(project / paths.test)
    canonical = pd.read_parquet(project / paths.canonical)
    test_keys = set(test["text"].str.casefold())
    unseen = canonical[
        canonical["label"].isin(held)
        & (canonical["origin_split"] != "test")
        & ~canonical["text"].str.casefold().isin(test_keys)
    ].drop_duplicates("text")
    pool = unseen.sample(frac=1, random_state=cfg.seed).groupby("label").head(cfg.pool_per_intent)
    return test, pool


def replay_shifted(demo: Demo, url: str, test, pool, held: Sequence[str], profiles: Path) -> dict[str, Any]:
    """Steps 2-3: replay test + pool over HTTP (cfg.replay_repeats times); accuracy before and closed windows."""
    import pandas as pd

    cfg = demo.cfg
    traffic = pd.concat([test[["text", "label"]], pool[["text", "label"]]]).sample(
        frac=1, random_state=cfg.seed
    )
    preds = replay(url, traffic["text"].tolist())
    for _ in range(cfg.replay_repeats - 1):
        replay(url, traffic["text"].tolist())
    by_text = {t: p["intent"] for t, p in zip(traffic["text"], preds, strict=True)}
    held_test = test.loc[test["label"].isin(held)]
    result = {
        "acc_before": accuracy([by_text[t] for t in test["text"]], test["label"].tolist()),
        "acc_before_heldout": accuracy([by_text[t] for t in held_test["text"]], held_test["label"].tolist()),
        "model_before": preds[0]["model_version"],
        "needs_review_share": round(sum(p["needs_review"] for p in preds) / len(preds), 4),
        "windows": wait_for_windows(profiles, cfg.replay_repeats * len(traffic) // cfg.window_rows),
    }
    demo.log(
        f"{len(traffic)} texts ({len(test)} test + {len(pool)} unseen of held-out intents); "
        f"acc_before {result['acc_before']:.4f}; {result['windows']} closed profile window(s)"
    )
    return result


def check_drift(demo: Demo, project: Path, paths: Any, windows: int) -> dict[str, Any]:
    """Step 4: `intentops drift-check` over the replayed windows must find drift."""
    from intentops.monitor.drift import DRIFT_EXIT_CODE

    code, _ = demo.run(project, "intentops", "drift-check", "--last-n", str(windows), ok=(0, DRIFT_EXIT_CODE))
    report = read_json(project / paths.drift_report)
    result = {
        "drift_exit_code": code,
        "drifted_features": report["drifted_features"],
        "drift_report": str(project / paths.drift_html),
        "drift_plot": str(project / paths.drift_plot),
    }
    demo.log(
        f"drift-check exit {code}; drifted: {report['drifted_features']}; report: {result['drift_report']}"
    )
    if code != DRIFT_EXIT_CODE:
        raise UserError(
            "drift-check found no drift in the shifted traffic",
            where=result["drift_report"],
            fix="hold out more intents (--k) or check the thresholds in conf/monitor/default.yaml",
        )
    return result


def retrain_and_swap(demo: Demo, project: Path, paths: Any, windows: int, url: str) -> dict[str, Any]:
    """Step 6: `intentops drift-check --retrain --serve-url`; what its report says of the retrain."""
    demo.run(project, "intentops", "drift-check", "--last-n", str(windows), "--retrain", "--serve-url", url)
    retrain = read_json(project / paths.drift_report)["retrain"]
    keys = ("new_labels", "exported_rows", "repro_seconds", "production_before", "production_after")
    summary = {k: retrain[k] for k in keys}
    summary["swap_seconds"] = retrain.get("swap_seconds")
    summary["gate_reasons"] = retrain["gate"].get("reasons")
    return {"retrain": summary, "after_stages": retrain.get("stages")}


def replay_test(demo: Demo, url: str, test, held: Sequence[str]) -> dict[str, Any]:
    """Step 7: replay the test split again; accuracy after, overall and on the held-out intents."""
    preds = replay(url, test["text"].tolist())
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
    """Run steps 1-7 (and the oracle) under `work`; returns the result record."""
    from intentops.monitor.profiles import list_windows

    demo = Demo(cfg, root, work, _env(mirror), log or Progress())
    t_loop = time.perf_counter()
    with demo.log.step("1. train with intents held out"):
        project, paths, held, result = train_with_holdout(demo)
    test, pool = shifted_traffic(project, paths, held, cfg)
    profiles = project / paths.monitoring_profiles
    with serve_project(project, demo.log) as url:
        with demo.log.step("2-3. replay shifted traffic over HTTP"):
            replayed = replay_shifted(demo, url, test, pool, held, profiles)
            windows = replayed.pop("windows")
            result.update(replayed)
        with demo.log.step("4. drift-check"):
            result.update(check_drift(demo, project, paths, windows))
        with demo.log.step("5. scripted annotators label the queue"):
            gold = dict(zip(pool["text"], pool["label"], strict=True))
            result["annotation"] = scripted_annotation(project, gold, cfg.per_intent)
            demo.log(f"{result['annotation']}")
        with demo.log.step("6. drift-check --retrain (export, dvc repro, gate, promote, swap)"):
            result.update(retrain_and_swap(demo, project, paths, windows, url))
        with demo.log.step("7. replay the test traffic again"):
            result.update(replay_test(demo, url, test, held))
    result["loop_seconds"] = round(time.perf_counter() - t_loop, 1)
    result["profile_windows"] = len(list_windows(str(profiles)))
    if cfg.oracle:
        with demo.log.step(ORACLE_STEP):
            result.update(build_oracle(demo, test))
        result["oracle_seconds"] = demo.log.marks[ORACLE_STEP]
    result.update(held_out=held, k=len(held), per_intent=cfg.per_intent, steps_seconds=dict(demo.log.marks))
    return result


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
    p.add_argument("--replay-repeats", type=int, default=LoopConfig.replay_repeats)
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
    for key in ("drift_report", "drift_plot"):
        src = Path(result[key])
        shutil.copy2(src, keep_dir / src.name)
        result[key] = str((keep_dir / src.name).resolve())
    (keep_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    from intentops.config import load_params, repo_root
    from intentops.data.sources import MIRROR_ENV

    args = build_parser().parse_args(argv)
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
        replay_repeats=args.replay_repeats,
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
