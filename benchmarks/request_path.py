"""CPU per text of each step a replica takes for a prediction besides Serve's own, in-process; prints ONE JSON line.

    python benchmarks/request_path.py [--bundle DIR] [--batches 1,13,32] [--window 400]

The steps of intentops.api (the suspects of a slow request path), each timed as CPU time (time.process_time)
over repeated calls with the real objects: the bundle's Predictor at 1 ONNX Runtime thread (as serving runs it),
the Recorder with its Ray metrics, a real SQLite ledger and a real whylogs profile writer. Figures are ms per
text at each model-call size in `--batches` (what a replica forms: 1 alone, ~13 at 32 concurrent clients on
2 cores); the profile step is timed per flush of `--window` texts (a flush every 5 s holds ~400 at 80 rps).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from serve_load import ROOT, TEXTS


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    """CPU ms per call of `fn` over `n` calls, after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) * 1000 / n


def recorder_for(tmp: Path, params) -> object:
    """A Recorder writing to a fresh SQLite ledger and whylogs profiles under `tmp`, as a replica sets it up."""
    from omegaconf import OmegaConf

    from intentops.api.recorder import Recorder
    from intentops.feedback import store

    db = tmp / "queue.db"
    engine = store.make_engine(f"sqlite:///{db}")
    store.upgrade(engine)
    engine.dispose()
    s = OmegaConf.to_container(params.serving, resolve=True)
    recorder = Recorder()
    recorder.open_store({**s["store"], "db": str(db)}, params, ROOT)
    recorder.profiles.open({**s["monitoring"], "profiles": str(tmp / "profiles")}, ROOT)
    return recorder


def steps(predictor, recorder, texts: list[str]) -> dict[str, float]:
    """CPU ms per text of each step for one model call of `texts`."""
    import orjson

    from intentops.api.schemas import PredictRequest, request_texts, shape_predictions

    b = len(texts)
    raw = predictor.predict(texts, top_k=3)
    rows = shape_predictions(raw, "m-bench")
    body = orjson.dumps({"text": texts[0]} if b == 1 else {"texts": texts})
    per_call = {
        "model (Predictor.predict)": cpu_ms(lambda: predictor.predict(texts, top_k=3), 200 // b + 10),
        "of which tokenizer + tfidf": cpu_ms(lambda: predictor.feeds(texts), 200),
        "body parse + checks (pydantic, text rules)": cpu_ms(
            lambda: request_texts(PredictRequest.model_validate_json(body), 64, 2000), 2000
        ),
        "ids + row shaping (uuid4)": cpu_ms(lambda: shape_predictions(raw, "m-bench"), 1000),
        "metrics (Ray counters, histograms)": cpu_ms(lambda: recorder._observe("m-bench", rows), 1000),
        "ledger (buffer + SQLite write)": cpu_ms(lambda: ledger_write(recorder, texts, raw), 100),
        "response (orjson)": cpu_ms(lambda: orjson.dumps({"predictions": rows}), 2000),
    }
    return {k: round(v / b, 4) for k, v in per_call.items()}


def ledger_write(recorder, texts: list[str], raw: list[dict]) -> None:
    from intentops.api.schemas import shape_predictions

    recorder.writer.add(texts, shape_predictions(raw, "m-bench"))  # new ids: the ledger refuses repeats
    recorder.writer.write_some()


def profile_ms_per_text(predictor, recorder, window: int) -> float:
    """CPU ms per text of one profile flush of `window` texts (features, whylogs track)."""
    from intentops.api.schemas import shape_predictions

    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(window)]
    rows = shape_predictions(predictor.predict(texts, top_k=3), "m-bench")

    def flush() -> None:
        recorder.profiles.add(texts, rows)
        recorder.profiles.write(recorder.profiles.take())

    return round(cpu_ms(flush, 10) / window, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: production)")
    parser.add_argument("--batches", default="1,13,32", help="model-call sizes, comma-separated")
    parser.add_argument("--window", type=int, default=400, help="texts per profile flush")
    args = parser.parse_args()

    import ray
    from omegaconf import OmegaConf

    from intentops.api.settings import resolve_bundle
    from intentops.config import load_params
    from intentops.inference.predictor import Predictor

    params = load_params(ROOT / "params.yaml")
    serving = OmegaConf.to_container(params.serving, resolve=True)
    bundle = args.bundle or resolve_bundle({**serving, "bundle": "production"}, ROOT)[0]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # the Recorder's metrics need Ray
    try:
        predictor = Predictor.load(bundle, threads=1)
        with tempfile.TemporaryDirectory(prefix="intentops-path-") as tmp:
            recorder = recorder_for(Path(tmp), params)
            out = {
                "bundle": str(bundle),
                "ms_per_text": {
                    b: steps(predictor, recorder, [TEXTS[i % len(TEXTS)] for i in range(b)])
                    for b in map(int, args.batches.split(","))
                },
                f"profile_flush_of_{args.window}_ms_per_text": profile_ms_per_text(
                    predictor, recorder, args.window
                ),
            }
    finally:
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
