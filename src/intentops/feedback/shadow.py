"""The shadow challenger's live figures (store table shadow_scores) and the promotion rules on them.

The serving replicas write one row per shadowed text (intentops.api.shadow): both versions, both intents and
confidences, the challenger's latency. `figures` sums up a (champion, challenger) pair, with accuracy on the
texts that reviewers labelled since (the review queue's resolved labels); `rule_failures` checks them against
`promote.shadow`, which `intentops registry promote` applies before it moves production.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from intentops.errors import UserError
from intentops.feedback import store

RULES_WHERE = "promote.shadow in params.yaml (conf/config.yaml)"
DEFAULT_RULES = {
    "required": False,
    "min_rows": 500,
    "min_agreement": 0.9,
    "min_labelled_rows": 0,
    "max_labelled_accuracy_drop": 0.0,
}


def pair_rows(engine: Any, champion: str | None, challenger: str | None) -> list[dict]:
    """The shadow rows of a (champion, challenger) pair; either None: any."""
    import sqlalchemy as sa

    t = store.shadow_scores
    query = sa.select(t).order_by(t.c.id)
    if champion:
        query = query.where(t.c.champion_version == champion)
    if challenger:
        query = query.where(t.c.challenger_version == challenger)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def resolved_labels(engine: Any, params: Any, prediction_ids: Iterable[str]) -> dict[str, str]:
    """The final review label of each of `prediction_ids` that has one (CLI or API votes, adjudication)."""
    from intentops.feedback.label import read_review

    review = read_review(engine, params)
    resolved = {pid: review.resolve(pid)[0] for pid in prediction_ids}
    return {pid: label for pid, label in resolved.items() if label is not None}


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile `q` (0-100) of values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


def figures(rows: list[Mapping[str, Any]], labels: Mapping[str, str]) -> dict[str, Any]:
    """Agreement (overall and per champion intent), mean confidences, challenger latency, labelled accuracy.

    Args:
        rows: shadow_scores rows of one (champion, challenger) pair.
        labels: prediction_id -> resolved label, for the rows labelled since.
    """
    n = len(rows)
    agree = [r["champion_intent"] == r["challenger_intent"] for r in rows]
    by_intent: dict[str, list[bool]] = defaultdict(list)
    for r, a in zip(rows, agree, strict=True):
        by_intent[r["champion_intent"]].append(a)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    latency = [float(r["challenger_ms"]) for r in rows]
    return {
        "champion": rows[0]["champion_version"] if rows else None,
        "challenger": rows[0]["challenger_version"] if rows else None,
        "rows": n,
        "agreement": mean(agree),
        "agreement_by_champion_intent": {
            k: {"rows": len(v), "agreement": mean(v)} for k, v in sorted(by_intent.items())
        },
        "mean_confidence": {
            "champion": mean([r["champion_confidence"] for r in rows]),
            "challenger": mean([r["challenger_confidence"] for r in rows]),
        },
        "challenger_call_ms": {"p50": percentile(latency, 50), "p95": percentile(latency, 95)},
        "first_at": str(rows[0]["created_at"]) if rows else None,
        "last_at": str(rows[-1]["created_at"]) if rows else None,
        "labelled": labelled_figures(rows, labels),
    }


def labelled_figures(rows: list[Mapping[str, Any]], labels: Mapping[str, str]) -> dict[str, Any]:
    """Accuracy of each model on the rows with a resolved label, and the labels of their disagreements."""
    done = [(r, labels[r["prediction_id"]]) for r in rows if r["prediction_id"] in labels]
    n = len(done)
    champ = sum(r["champion_intent"] == y for r, y in done)
    chall = sum(r["challenger_intent"] == y for r, y in done)
    split: dict[str, Counter] = defaultdict(Counter)
    for r, y in done:
        if r["champion_intent"] != r["challenger_intent"]:
            right = (
                "champion"
                if r["champion_intent"] == y
                else "challenger"
                if r["challenger_intent"] == y
                else "neither"
            )
            split[y][right] += 1
    return {
        "rows": n,
        "champion_accuracy": round(champ / n, 4) if n else None,
        "challenger_accuracy": round(chall / n, 4) if n else None,
        "accuracy_drop": round((champ - chall) / n, 4) if n else None,
        # per true label of a disagreement: who had it right
        "disagreements": {
            y: {"rows": sum(c.values()), **{k: c[k] for k in ("champion", "challenger", "neither")}}
            for y, c in sorted(split.items())
        },
    }


def check_rules(rules: Mapping[str, Any]) -> dict[str, Any]:
    """`promote.shadow` with defaults filled in; refuses a value that cannot work."""
    out = {**DEFAULT_RULES, **dict(rules or {})}
    unknown = sorted(set(out) - set(DEFAULT_RULES))
    if unknown:
        raise UserError(
            f"unknown promote.shadow key(s) {unknown}", where=RULES_WHERE, fix=f"use {sorted(DEFAULT_RULES)}"
        )
    if not isinstance(out["required"], bool):
        raise UserError("promote.shadow.required must be true or false", where=RULES_WHERE, fix="fix it")
    for key, low, high in (
        ("min_rows", 0, None),
        ("min_labelled_rows", 0, None),
        ("min_agreement", 0, 1),
        ("max_labelled_accuracy_drop", -1, 1),
    ):
        v = out[key]
        if (
            not isinstance(v, int | float)
            or isinstance(v, bool)
            or v < low
            or (high is not None and v > high)
        ):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise UserError(
                f"promote.shadow.{key} must be a number {span}, got {v!r}", where=RULES_WHERE, fix="fix it"
            )
    return out


def rule_failures(figs: Mapping[str, Any] | None, rules: Mapping[str, Any]) -> list[str]:
    """What the figures miss of the rules (none when the rules are not required)."""
    if not rules["required"]:
        return []
    if not figs or not figs["rows"]:
        return ["no shadow rows for this (production, candidate) pair"]
    out = []
    if figs["rows"] < rules["min_rows"]:
        out.append(f"{figs['rows']} shadowed texts < min_rows {rules['min_rows']}")
    if figs["agreement"] < rules["min_agreement"]:
        out.append(f"agreement {figs['agreement']:.4f} < min_agreement {rules['min_agreement']}")
    lab = figs["labelled"]
    if lab["rows"] < rules["min_labelled_rows"]:
        out.append(f"{lab['rows']} labelled texts < min_labelled_rows {rules['min_labelled_rows']}")
    if lab["rows"] and lab["accuracy_drop"] > rules["max_labelled_accuracy_drop"]:
        out.append(
            f"labelled accuracy drops {lab['accuracy_drop']:+.4f} (champion {lab['champion_accuracy']}, "
            f"challenger {lab['challenger_accuracy']}) > max_labelled_accuracy_drop "
            f"{rules['max_labelled_accuracy_drop']}"
        )
    return out


def open_store(params: Any | None) -> Any | None:
    """An engine on the configured store, or None when there is none to read (no URL, no SQLite file yet).

    $INTENTOPS_DB_URL, else params' paths.feedback_db; a SQLite file that does not exist is not created.
    """
    url = os.environ.get(store.DB_URL_ENV)
    if not url:
        if params is None or not Path(params.paths.feedback_db).is_file():
            return None
        url = store.db_url(params.paths.feedback_db)
    engine = store.make_engine(url)
    try:
        store.check_schema(engine)
    except UserError:
        engine.dispose()
        raise
    return engine


def pair_figures(params: Any | None, champion: str | None, challenger: str | None) -> dict[str, Any] | None:
    """The figures of the pair from the configured store; None when there is no store to read.

    Labelled figures need the labelling rules (params.feedback.label): without the project's params, none.
    """
    engine = open_store(params)
    if engine is None:
        return None
    try:
        rows = pair_rows(engine, champion, challenger)
        pids = [r["prediction_id"] for r in rows]
        labels = resolved_labels(engine, params, pids) if rows and params is not None else {}
    finally:
        engine.dispose()
    return {**figures(rows, labels), "champion": champion, "challenger": challenger}


def gate(
    params: Any | None, champion: str | None, challenger: str | None, out: Path
) -> dict[str, Any] | None:
    """`intentops registry promote`'s shadow step: figures printed and written to `out`, rules applied.

    Raises a UserError when `promote.shadow.required` and the figures miss a rule (or the store cannot be
    read); otherwise a store that cannot be read is reported and skipped.
    """
    rules = check_rules(params.promote.get("shadow") if params is not None else None)
    try:
        figs = pair_figures(params, champion, challenger)
    except UserError as err:
        if rules["required"]:
            raise
        print(f"shadow figures skipped: {err.what}")
        return None
    failures = rule_failures(figs, rules)
    if figs is not None and figs["rows"]:
        report = {**figs, "rules": rules, "failures": failures}
        from intentops.io import write_json

        write_json(out, report)
        print(f"shadow {champion} vs {challenger}: {json.dumps(summary(figs))} (written to {out})")
    if failures:
        raise UserError(
            f"the shadow challenger's figures miss promote.shadow: {'; '.join(failures)}",
            where=f"{RULES_WHERE}; figures: {out if figs else 'none (no store or no rows)'}",
            fix="let the candidate shadow longer (serving.shadow.enabled: true), label more of its texts "
            "(intentops label), stage a better one, or set promote.shadow.required: false",
        )
    return figs


def summary(figs: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures for one line of output."""
    lab = figs["labelled"]
    return {
        "rows": figs["rows"],
        "agreement": figs["agreement"],
        "challenger_call_p95_ms": figs["challenger_call_ms"]["p95"],
        "labelled": lab["rows"],
        "accuracy": {"champion": lab["champion_accuracy"], "challenger": lab["challenger_accuracy"]},
    }
