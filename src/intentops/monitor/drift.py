"""Drift check: the latest profile windows against the reference profile, per feature, with whylogs.

`intentops drift-check` exits 0 when no feature drifted, DRIFT_EXIT_CODE (10) when drift was
found, and 2 for any other problem (missing profiles, too few rows, bad config). With `--retrain`
(see `retrain.py`): 0 no drift (nothing to do) or a new model promoted, 11 drift but too few new
reviewed labels, 12 retrained but not promoted.
"""

from __future__ import annotations

import base64
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from intentops.errors import UserError
from intentops.monitor.profiles import import_whylogs, load_windows, read_view, url_to_fs

if TYPE_CHECKING:
    from whylogs.core import DatasetProfileView

log = logging.getLogger(__name__)

DRIFT_EXIT_CODE = 10
# Tests whose measure is a p-value (drift when below the threshold); the others give a distance (drift when above).
P_VALUE_TESTS = ("ks", "chi_square")
ALGORITHMS = (*P_VALUE_TESTS, "hellinger")
DRIFT, POSSIBLE_DRIFT, NO_DRIFT = "DRIFT", "POSSIBLE_DRIFT", "NO_DRIFT"


class DriftDetected(UserError):
    """Drift was found: reported like an error so that scripts and CI see a distinct exit code."""

    exit_code = DRIFT_EXIT_CODE


def _algorithm(name: str, feature: str) -> Any:
    import_whylogs()
    from whylogs.viz.drift.column_drift_algorithms import KS, ChiSquare, Hellinger

    algorithms = {"ks": KS, "chi_square": ChiSquare, "hellinger": Hellinger}
    if name not in algorithms:
        raise UserError(
            f"unknown drift test {name!r} for feature {feature!r}",
            where=f"monitor.drift.algorithms.{feature}",
            fix=f"use one of {', '.join(ALGORITHMS)}",
        )
    return algorithms[name]()


def categorize(algorithm: str, value: float, thresholds: Mapping[str, Mapping[str, float]]) -> str:
    """DRIFT, POSSIBLE_DRIFT or NO_DRIFT for one test's measure under the configured thresholds."""
    t = thresholds[algorithm]
    if algorithm in P_VALUE_TESTS:
        return DRIFT if value < t["drift"] else POSSIBLE_DRIFT if value < t["possible_drift"] else NO_DRIFT
    return DRIFT if value > t["drift"] else POSSIBLE_DRIFT if value > t["possible_drift"] else NO_DRIFT


def row_count(view: DatasetProfileView) -> int:
    """Rows in a profile (the largest count over its columns)."""
    counts = [c.get_metric("counts") for c in view.get_columns().values()]
    return max((int(m.n.value) for m in counts if m is not None), default=0)


def compare(
    reference_view: DatasetProfileView, current_view: DatasetProfileView, thresholds: Mapping[str, Any]
) -> dict[str, Any]:
    """Score every configured feature present in both profiles and apply the thresholds.

    Args:
        reference_view: the reference profile (training-time features).
        current_view: the merged recent windows.
        thresholds: the `monitor.drift` config: `algorithms` (feature -> ks | chi_square | hellinger),
            `thresholds` (algorithm -> {drift, possible_drift}) and `min_drifted_features`.

    Returns:
        the report: `drift`, `drifted_features`, `possible_drift_features`, per-feature `features`
        (algorithm, measure, value, statistic, category), `skipped` features with the reason, `rows`.
    """
    import_whylogs()
    from whylogs.viz.drift.column_drift_algorithms import calculate_drift_scores

    algorithms = dict(thresholds["algorithms"])
    ref_cols, cur_cols = reference_view.get_columns(), current_view.get_columns()
    skipped = {
        f: f"not in the {'reference' if f not in ref_cols else 'current'} profile"
        for f in algorithms
        if f not in ref_cols or f not in cur_cols
    }
    drift_map = {f: _algorithm(a, f) for f, a in algorithms.items() if f not in skipped}
    scores = calculate_drift_scores(current_view, reference_view, drift_map=drift_map) if drift_map else {}

    features: dict[str, dict[str, Any]] = {}
    for feature, name in algorithms.items():
        if feature in skipped:
            continue
        score = scores.get(feature)
        value = None if score is None else score.get("pvalue" if name in P_VALUE_TESTS else "statistic")
        if value is None or not math.isfinite(float(value)):
            skipped[feature] = "whylogs could not score it (empty or missing metric)"
            continue
        value = float(value)
        features[feature] = {
            "algorithm": name,
            "measure": "p-value" if name in P_VALUE_TESTS else "distance",
            "value": value,
            "statistic": float(score["statistic"]),
            "category": categorize(name, value, thresholds["thresholds"]),
            "thresholds": dict(thresholds["thresholds"][name]),
        }
    drifted = [f for f, s in features.items() if s["category"] == DRIFT]
    return {
        "drift": len(drifted) >= int(thresholds["min_drifted_features"]) and bool(drifted),
        "drifted_features": drifted,
        "possible_drift_features": [f for f, s in features.items() if s["category"] == POSSIBLE_DRIFT],
        "min_drifted_features": int(thresholds["min_drifted_features"]),
        "rows": {"reference": row_count(reference_view), "current": row_count(current_view)},
        "features": features,
        "skipped": skipped,
    }


def _histograms(
    reference_view: DatasetProfileView,
    current_view: DatasetProfileView,
    feature: str,
    algorithm: str,
    bins: int = 20,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(bin labels, reference shares, current shares) of one feature, read back from the sketches."""
    ref_col, cur_col = reference_view.get_column(feature), current_view.get_column(feature)
    if algorithm == "chi_square":

        def freq(col: Any) -> dict[str, float]:
            items = col.get_metric("frequent_items").to_summary_dict()["frequent_strings"]
            n = max(int(col.get_metric("counts").n.value), 1)
            return {i.value: i.est / n for i in items}

        ref, cur = freq(ref_col), freq(cur_col)
        labels = sorted(set(ref) | set(cur), key=lambda v: -(ref.get(v, 0) + cur.get(v, 0)))[:12]
        return (
            labels,
            np.array([ref.get(v, 0.0) for v in labels]),
            np.array([cur.get(v, 0.0) for v in labels]),
        )
    ref_kll = ref_col.get_metric("distribution").kll.value
    cur_kll = cur_col.get_metric("distribution").kll.value
    lo = min(ref_kll.get_min_value(), cur_kll.get_min_value())
    hi = max(ref_kll.get_max_value(), cur_kll.get_max_value())
    if hi <= lo:
        return [f"{lo:g}"], np.array([1.0]), np.array([1.0])
    edges = np.linspace(lo, hi, bins + 1)
    # get_pmf over the inner edges gives len(edges) masses: below edges[1], ..., at or above edges[-2].
    inner = list(edges[1:-1])
    labels = [f"{e:.3g}" for e in edges[:-1]]
    return labels, np.array(ref_kll.get_pmf(inner)), np.array(cur_kll.get_pmf(inner))


def render_report(
    report: Mapping[str, Any],
    reference_view: DatasetProfileView,
    current_view: DatasetProfileView,
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
) -> None:
    """Write the drift figure (scores, then reference vs current per feature) and an HTML page around it."""
    from jinja2 import Environment
    from matplotlib.figure import Figure

    from intentops.io import atomic_path

    features = report["features"]
    ncols = 3
    nrows = 1 + math.ceil(len(features) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.2 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    ax = fig.add_subplot(grid[0, :])
    colors = {DRIFT: "tab:red", POSSIBLE_DRIFT: "tab:orange", NO_DRIFT: "tab:green"}
    names = list(features)
    ax.bar(
        names,
        [s["value"] for s in features.values()],
        color=[colors[s["category"]] for s in features.values()],
    )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("p-value or distance")
    ax.set_title(
        "Drift per feature (dashed: drift threshold): red = drift, orange = possible drift, green = none"
    )
    for i, (feature, s) in enumerate(features.items()):
        ax.hlines(s["thresholds"]["drift"], i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        label = f"{'p' if s['measure'] == 'p-value' else 'd'} = {s['value']:.3g}\n{s['category']}"
        ax.text(i, min(s["value"], 1.0) + 0.02, label, ha="center", va="bottom", fontsize=8)
        sub = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        labels, ref, cur = _histograms(reference_view, current_view, feature, s["algorithm"])
        x = np.arange(len(labels))
        sub.bar(x - 0.2, ref, width=0.4, label="reference", color="tab:blue")
        sub.bar(x + 0.2, cur, width=0.4, label="current", color=colors[s["category"]])
        step = max(1, len(labels) // 8)
        sub.set_xticks(x[::step], labels[::step], rotation=30, fontsize=7)
        sub.set_title(f"{feature} ({s['algorithm']} {s['measure']} = {s['value']:.3g})", fontsize=9)
        sub.set_ylabel("share of rows", fontsize=8)
        sub.legend(fontsize=7)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
        png = tmp.read_bytes()

    page = (
        Environment(autoescape=True)
        .from_string(_HTML)
        .render(report=report, image=base64.b64encode(png).decode("ascii"))
    )
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>intentops drift check</title>
<style>body{font-family:sans-serif;margin:2em} td,th{padding:.3em .8em;border-bottom:1px solid #ddd}
.DRIFT{color:#b00;font-weight:bold} .POSSIBLE_DRIFT{color:#c60}</style></head><body>
<h1>Drift check: {{ "DRIFT" if report.drift else "no drift" }}</h1>
<p>{{ report.rows.current }} current rows from {{ report.windows|length }} window(s) against
{{ report.rows.reference }} reference rows. Drift is declared when at least
{{ report.min_drifted_features }} feature(s) are in the DRIFT category.</p>
<table><tr><th>feature</th><th>test</th><th>measure</th><th>value</th><th>drift below/above</th><th>category</th></tr>
{% for name, s in report.features.items() %}<tr><td>{{ name }}</td><td>{{ s.algorithm }}</td><td>{{ s.measure }}</td>
<td>{{ "%.4g"|format(s.value) }}</td><td>{{ s.thresholds.drift }}</td><td class="{{ s.category }}">{{ s.category }}</td></tr>
{% endfor %}</table>
{% if report.skipped %}<h2>Not checked</h2><ul>{% for name, why in report.skipped.items() %}
<li>{{ name }}: {{ why }}</li>{% endfor %}</ul>{% endif %}
<img alt="drift per feature" style="max-width:100%" src="data:image/png;base64,{{ image }}">
</body></html>
"""


def read_reference(path: str, storage_options: dict[str, Any] | None = None) -> DatasetProfileView:
    """Read the reference profile written by `profiles.write_reference`."""
    fs, root = url_to_fs(str(path), storage_options)
    if not fs.isfile(root):
        raise UserError(
            "reference profile not found",
            where=str(path),
            fix="build it from the training data with `intentops drift-reference`, or pass --reference",
        )
    return read_view(fs.cat_file(root), str(path))


def dispatch_drift(report: Mapping[str, Any]) -> None:
    """Send the `drift-detected` repository_dispatch that `.github/workflows/retrain.yml` listens for."""
    from intentops.monitor.dispatch import send_repository_dispatch

    send_repository_dispatch(
        "drift-detected",
        {
            "drifted_features": report["drifted_features"],
            "current_rows": report["rows"]["current"],
            "windows": len(report["windows"]),
            "last_window": Path(report["windows"][-1]).name if report["windows"] else None,
        },
    )


def load_current(profiles: str, last_n: int, min_rows: int) -> tuple[Any, list[str], int]:
    """The merged view of the last `last_n` closed windows, their paths and row count; refuses too few rows."""
    if last_n < 1:
        raise UserError(
            f"--last-n must be at least 1, got {last_n}", where="--last-n", fix="pass --last-n 1 or more"
        )
    current_view, windows = load_windows(profiles, last_n)
    current_rows = row_count(current_view)
    if current_rows < min_rows:
        raise UserError(
            f"only {current_rows} rows in the last {len(windows)} window(s); at least {min_rows} are needed "
            "for a meaningful test",
            where=str(profiles),
            fix="raise --last-n, wait for more traffic, or lower monitor.drift.min_rows",
        )
    return current_view, windows, current_rows


def main(
    params: Any,
    *,
    reference: str | None = None,
    profiles: str | None = None,
    last_n: int | None = None,
    dispatch: bool = False,
    retrain: bool = False,
    serve_url: str | None = None,
) -> dict[str, Any]:
    """Run the drift check the CLI asks for: load, compare, write reports, then act on drift.

    Args:
        retrain: on drift, run `retrain.retrain` (export labels, dvc repro, gate, promotion, swap).
        serve_url: with `retrain`, wait until the app at this URL serves the promoted version.

    Raises:
        DriftDetected: drift was found (after the reports are written and any dispatch is sent), without `retrain`.
    """
    from intentops.io import write_json

    cfg, paths = params.monitor.drift, params.paths
    reference = reference or paths.monitoring_reference
    profiles = profiles or paths.monitoring_profiles
    last_n = int(last_n if last_n is not None else cfg.last_n)
    reference_view = read_reference(reference)
    current_view, windows, current_rows = load_current(profiles, last_n, int(cfg.min_rows))
    report = compare(reference_view, current_view, cfg)
    report.update(reference=str(reference), profiles=str(profiles), windows=windows)
    write_json(paths.drift_report, report)
    render_report(report, reference_view, current_view, paths.drift_html, paths.drift_plot)
    log.info("drift report: %s, %s", paths.drift_report, paths.drift_html)
    print(f"drift report: {paths.drift_report}, {paths.drift_html}, {paths.drift_plot}", flush=True)

    if not report["drift"]:
        print(
            f"no drift ({current_rows} rows, {len(windows)} window(s)); report: {paths.drift_report}"
            + ("; nothing to retrain" if retrain else "")
        )
        return report
    if dispatch:
        dispatch_drift(report)
    if retrain:
        from intentops.monitor.retrain import retrain as run_retrain

        print(f"drift in {', '.join(report['drifted_features'])}: retraining", flush=True)
        report["retrain"] = run_retrain(params, report, serve_url)
        write_json(paths.drift_report, report)
        return report
    raise DriftDetected(
        f"drift in {len(report['drifted_features'])} feature(s): {', '.join(report['drifted_features'])}",
        where=f"{paths.drift_report} (and {paths.drift_html})",
        fix="read the report; if the shift is real, label fresh data (`intentops label`) and retrain",
    )
