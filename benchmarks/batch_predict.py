"""Throughput of `intentops predict` against the Predictor in-process and raw ONNX Runtime; prints ONE JSON line.

    python benchmarks/batch_predict.py --bundle models/registry/<version> --input test.csv \\
        [--text-column text] [--batch-size 256] [--top-k 3] [--repeats 3] [--workdir DIR]

On one loaded bundle (same ONNX Runtime session and threads) and the same batches of --batch-size rows, each
repeat times in turn:
  predict      `intentops.inference.batch.predict_file`, the function `intentops predict` calls: read the
               table, Predictor.predict per batch, build the columns, write the output (CSV) atomically;
  in_process   `Predictor.predict` on the same texts in the same batches (texts already in memory, results kept);
  raw          ONNX Runtime alone: per batch, the texts sorted by length in sub-batches of --session-batch (as
               OnnxPredictor does), tokenised and TF-IDF'd (`OnnxPredictor.feeds`) and `session.run(["logits"])`;
               no calibration, no out-of-scope scoring, no dicts.
It reports rows/s of each and the ratios predict/in_process and predict/raw (paired per repeat): medians and
[min, max] over the repeats. Separately, `cli` is the end-to-end wall time of the `intentops predict` command
(interpreter start, imports and bundle load included), once per repeat. The bundle must be an ONNX bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spread(values: list[float], digits: int = 1) -> dict:
    """Median and [min, max] of the repeats."""
    return {
        "median": round(statistics.median(values), digits),
        "spread": [round(min(values), digits), round(max(values), digits)],
    }


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def time_in_process(predictor, chunks: list[list[str]], top_k: int) -> float:
    """Seconds of Predictor.predict over the batches."""
    t0 = time.perf_counter()
    for chunk in chunks:
        predictor.predict(chunk, top_k=top_k)
    return time.perf_counter() - t0


def time_raw(predictor, chunks: list[list[str]], session_batch: int) -> float:
    """Seconds of tokenise + TF-IDF + session.run(["logits"]) over the batches, length-sorted sub-batches."""
    t0 = time.perf_counter()
    for chunk in chunks:
        ordered = sorted(chunk, key=len)
        for sub in batches(ordered, session_batch):
            predictor.session.run(["logits"], predictor.feeds(sub))
    return time.perf_counter() - t0


def time_predict_file(predictor, args: argparse.Namespace, dest: Path) -> float:
    """Seconds of the function `intentops predict` calls, on the loaded predictor."""
    from intentops.inference.batch import predict_file

    t0 = time.perf_counter()
    predict_file(predictor, args.input, dest, args.text_column, args.batch_size, args.top_k, progress=False)
    return time.perf_counter() - t0


def time_cli(args: argparse.Namespace, dest: Path) -> float:
    """Wall seconds of the `intentops predict` command, start to exit."""
    exe = Path(sys.executable).with_name("intentops")
    cmd = [str(exe), "predict", args.input, "-o", str(dest), "--bundle", args.bundle]
    cmd += [
        "--text-column",
        args.text_column,
        "--batch-size",
        str(args.batch_size),
        "--top-k",
        str(args.top_k),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    from intentops.inference.batch import input_texts, read_table
    from intentops.inference.predictor import OnnxPredictor, Predictor, ort_threads

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="an ONNX bundle folder (e.g. a registry version)")
    parser.add_argument("--input", required=True, help="a CSV/Parquet/JSON-lines table of texts")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--session-batch", type=int, default=64, help="raw: rows per session.run")
    parser.add_argument("--workdir", help="where the outputs go (default: a temporary folder)")
    args = parser.parse_args()

    predictor = Predictor.load(args.bundle)
    if not isinstance(predictor, OnnxPredictor):
        sys.exit(f"{args.bundle} is not an ONNX bundle: run the export stage and pass its bundle")
    texts = input_texts(read_table(args.input), args.text_column, args.input)
    chunks = batches(texts, args.batch_size)
    predictor.predict(chunks[0], top_k=args.top_k)  # warm-up: the session's first runs allocate
    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="batch-predict-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for _ in range(args.repeats):
            runs.append(
                {
                    "predict": time_predict_file(predictor, args, work / "predict.csv"),
                    "in_process": time_in_process(predictor, chunks, args.top_k),
                    "raw": time_raw(predictor, chunks, args.session_batch),
                    "cli": time_cli(args, work / "cli.csv"),
                }
            )
    rate = {k: [len(texts) / r[k] for r in runs] for k in runs[0]}
    print(
        json.dumps(
            {
                "bundle": args.bundle,
                "version": predictor.version,
                "input": args.input,
                "rows": len(texts),
                "batch_size": args.batch_size,
                "top_k": args.top_k,
                "ort_threads": ort_threads(None, predictor.meta),
                "repeats": args.repeats,
                "rows_per_s": {k: spread(rate[k]) for k in ("predict", "in_process", "raw")},
                "ratio": {
                    "predict_vs_in_process": spread(
                        [p / i for p, i in zip(rate["predict"], rate["in_process"], strict=True)], 3
                    ),
                    "predict_vs_raw": spread(
                        [p / r for p, r in zip(rate["predict"], rate["raw"], strict=True)], 3
                    ),
                },
                "cli": {"wall_s": spread([r["cli"] for r in runs], 2), "rows_per_s": spread(rate["cli"])},
                "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
