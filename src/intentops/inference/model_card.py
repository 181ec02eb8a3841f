"""The model card people read (model_card.md in an exported bundle): its facts, collected from the stages'
reports, and their rendering with the Jinja2 template shipped next to this module (model_card.md.j2).

`card_context` turns what `export` loaded into one plain dict (None where an input was missing, so the
template says so instead of failing); `render_card` renders it. Neither sees a path or the config object.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

TEMPLATE = "model_card.md.j2"
WORST_INTENTS = 10
CONFUSED_PAIRS = 5
# Slices named as a limitation: at least this many test rows, and accuracy this far (points) below overall.
MIN_SLICE_ROWS = 20
SLICE_GAP_PT = 1.0


def params_sha256(params: dict) -> str:
    """sha256 of the resolved parameters as canonical JSON (sorted keys, no spaces): card.json's "params"."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_section(params: dict, sizes: dict[str, int], n_intents: int) -> dict:
    """Dataset name, licence, source URL, rows per split and the number of intents."""
    data = params.get("data") or {}
    return {
        "name": data.get("name"),
        "licence": data.get("licence"),
        "source_url": data.get("source_url"),
        "oos_label": data.get("oos_label"),
        "rows": dict(sizes),
        "n_intents": n_intents,
    }


def worst_intents(per_class: list[dict] | None, top: int = WORST_INTENTS) -> list[dict] | None:
    """The `top` intents by test F1 (lowest first; ties by name), from evaluate's per-class report."""
    if not per_class:
        return None
    rows = sorted(per_class, key=lambda r: (r["f1"], r["intent"]))[:top]
    keep = ("intent", "f1", "precision", "recall", "support")
    return [{k: r[k] for k in keep} for r in rows]


def metrics_section(evaluate: dict | None, train: dict | None, export: dict) -> dict:
    """Test metrics: evaluate's (as served) when it ran, else train's; the served operating point and baseline."""
    test = (evaluate or {}).get("test") or (train or {}).get("test")
    return {
        "source": "evaluate" if (evaluate or {}).get("test") else ("train" if test else None),
        "test": test,
        "operating_point": (evaluate or {}).get("operating_point"),
        "baseline_accuracy": (evaluate or {}).get("baseline_accuracy"),
        "fp32": {k: export["fp32"].get(k) for k in ("accuracy", "macro_f1")} if "fp32" in export else None,
    }


def calibration_section(calibrate: dict | None, temperature: float) -> dict:
    """ECE before and after temperature scaling on val and test (calibrate's figures), and the temperature."""
    sets = {
        name: {k: (calibrate or {})[name].get(k) for k in ("ece_before", "ece_after")}
        for name in ("val", "test")
        if name in (calibrate or {})
    }
    return {"temperature": temperature, "ece": sets or None}


def ood_section(calibration: dict, calibrate: dict | None) -> dict:
    """The out-of-scope operating point: method, threshold and target, and what calibrate measured there."""
    ood = calibration.get("out_of_scope") or {}
    keep = ("n_in_scope", "n_oos", "coverage", "oos_recall", "in_scope_accuracy", "needs_review_rate")
    measured = {
        name: {k: (calibrate or {})[name][k] for k in keep if k in (calibrate or {})[name]}
        for name in ("val", "test")
        if name in (calibrate or {})
    }
    rows = (calibrate or {}).get("calibration_rows") or {}
    return {
        "method": ood.get("method"),
        "threshold": ood.get("threshold"),
        "target": (calibrate or {}).get("target") or ood.get("target"),
        "fitted_on": rows.get("source"),
        "expected": rows.get("expected"),
        "measured": measured or None,
        "review": calibration.get("review") or {},
        "warnings": (calibrate or {}).get("warnings") or [],
    }


def int8_section(export: dict, variant_check: dict | None) -> dict | None:
    """fp32 vs int8 on test: accuracy, macro-F1, size, agreement and the accuracy check; None without int8."""
    if "int8" not in export:
        return None
    fp32, int8 = export["fp32"], export["int8"]
    graphs = {
        name: {k: m.get(k) for k in ("accuracy", "macro_f1", "bytes")}
        | {"ece": (m.get("calibration") or {}).get("ece")}
        for name, m in (("fp32", fp32), ("int8", int8))
    }
    return {
        "graphs": graphs,
        "argmax_agreement": int8.get("argmax_agreement_with_fp32"),
        "max_abs_prob_diff": int8.get("max_abs_prob_diff_vs_fp32"),
        "check": variant_check,
        "own_calibration": not (int8.get("calibration_check_val") or {}).get("fp32_calibration_holds", True),
    }


def limitations(
    errors: dict | None, per_class: list[dict] | None, overall_accuracy: float | None
) -> dict | None:
    """Known limitations from evaluate's error analysis: most-confused pairs, weak slices, intents that
    attract other intents' messages (false positives over false negatives)."""
    if errors is None and not per_class:
        return None
    pairs = [
        {k: p[k] for k in ("true", "predicted", "count")} | {"example": (p.get("examples") or [None])[0]}
        for p in (errors or {}).get("pairs", [])[:CONFUSED_PAIRS]
    ]
    slices = [
        s
        for s in (errors or {}).get("slices", [])
        if overall_accuracy is not None
        and s.get("accuracy") is not None
        and s["n"] >= MIN_SLICE_ROWS
        and (overall_accuracy - s["accuracy"]) * 100 >= SLICE_GAP_PT
    ]
    attract = sorted(
        (r for r in per_class or [] if r["false_positives"] > r["false_negatives"]),
        key=lambda r: (r["false_negatives"] - r["false_positives"], r["intent"]),
    )[:3]
    return {
        "pairs": pairs if errors is not None else None,
        "slices": sorted(slices, key=lambda s: s["accuracy"]),
        "attract": [{k: r[k] for k in ("intent", "false_positives", "false_negatives")} for r in attract],
    }


def card_context(
    card: dict, reports: dict, sizes: dict[str, int], n_intents: int, inputs_sha256: dict[str, str]
) -> dict:
    """Everything model_card.md says, as plain data; a missing report leaves its section None.

    Args:
        card: card.json as `export` builds it (version, model, calibration, metrics, params, git_revision).
        reports: "export" (export's metrics, required), "parity" (required), "variant_check" (bundle.json's
            int8 check or None), and evaluate's "eval", "per_class", "errors" and calibrate's "calibrate"
            reports and train's "train" metrics, each None when that report is missing.
        sizes: rows per split ({"train": n, ...}); n_intents: the number of labels the model predicts.
        inputs_sha256: {input name: sha256} of the files export read.
    """
    params = card.get("params") or {}
    metrics = metrics_section(reports.get("eval"), reports.get("train"), reports["export"])
    calibration = card.get("calibration") or {}
    return {
        "version": card.get("version"),
        "model": card.get("model"),
        "data": data_section(params, sizes, n_intents),
        "metrics": metrics,
        "worst": worst_intents(reports.get("per_class")),
        "calibration": calibration_section(reports.get("calibrate"), calibration.get("temperature", 1.0)),
        "ood": ood_section(calibration, reports.get("calibrate")),
        "int8": int8_section(reports["export"], reports.get("variant_check")),
        "parity": {k: reports["parity"].get(k) for k in ("argmax_agreement", "max_abs_prob_diff")},
        "limitations": limitations(
            reports.get("errors"), reports.get("per_class"), (metrics["test"] or {}).get("accuracy")
        ),
        "reproduce": {
            "git_revision": card.get("git_revision"),
            "dirty": str(card.get("git_revision", "")).endswith("+dirty"),
            "inputs_sha256": dict(inputs_sha256),
            "params_sha256": params_sha256(params),
        },
    }


def fmt(value, digits: int = 4) -> str:
    """A number for the card: `digits` places, "–" for None."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(value, digits: int = 1) -> str:
    """A share as a percentage ("94.2 %"), "–" for None."""
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def cell(text) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, one line)."""
    return "–" if text is None else " ".join(str(text).split()).replace("|", "\\|")


def render_card(context: dict) -> str:
    """model_card.md from `card_context`'s dict, with the template shipped in this package."""
    import jinja2

    source = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; table cells go through `cell`
    )
    env.filters.update(fmt=fmt, pct=pct, cell=cell)
    return env.from_string(source).render(**context)
