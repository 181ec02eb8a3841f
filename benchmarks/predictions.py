"""Predict a labelled split with a bundle and write one CSV row per text; print ONE JSON line with its hash.

    python benchmarks/predictions.py --bundle models/bundle --split data/processed/test.parquet --out preds.csv

The CSV (text, label, intent, confidence rounded to 6 places, out_of_scope, reason, needs_review) is what a
refactor must leave unchanged: compare the files (or their sha256) of two runs, not only their accuracy. Files of
0.1 have no needs_review column, and their out_of_scope was true for every reason: compare `reason` with them.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import pandas as pd


def main() -> None:
    from intentops.inference.predictor import Predictor

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="models/bundle")
    parser.add_argument("--split", default="data/processed/test.parquet")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    frame = pd.read_parquet(args.split)
    rows = Predictor.load(args.bundle).predict(frame["text"].tolist())
    out = frame[["text", "label"]].assign(
        intent=[r["intent"] for r in rows],
        confidence=[round(r["confidence"], 6) for r in rows],
        out_of_scope=[r["out_of_scope"] for r in rows],
        reason=[r["reason"] for r in rows],
        needs_review=[r["needs_review"] for r in rows],
    )
    out.to_csv(args.out, index=False)
    data = open(args.out, "rb").read()
    print(
        json.dumps(
            {
                "rows": len(out),
                "accuracy": round(float((out["intent"] == out["label"]).mean()), 4),
                "out_of_scope": int(out["out_of_scope"].sum()),
                "needs_review": int(out["needs_review"].sum()),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    )


if __name__ == "__main__":
    main()
