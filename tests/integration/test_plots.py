"""Every plot dvc.yaml declares renders with `dvc plots show`, in a real DVC repo holding the project's dvc.yaml,
params and plot templates (.dvc/plots), from files the `evaluate` and `calibrate` writers produce (~20 s on 2 cores)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from intentops.scratch import PLOT_TEMPLATES
from support import ROOT, run

LABELS = ["card_arrival", "card_linking", "exchange_rate", "top_up_failed", "verify_my_identity"]


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> dict:
    """`dvc plots show --json`'s data, by plot id, for plot files written by the stages' own writers."""
    from omegaconf import OmegaConf

    from intentops.inference.ood import risk_coverage, roc_points
    from intentops.stages import calibrate, evaluate

    root = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, root / name)
    run(["dvc", "init", "--no-scm", "-q"], root)
    shutil.copytree(ROOT / PLOT_TEMPLATES, root / PLOT_TEMPLATES)
    paths = OmegaConf.load(root / "params.yaml").paths
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(LABELS), 400)
    logits = rng.normal(size=(len(y), len(LABELS))) + 3.0 * np.eye(len(LABELS))[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = evaluate.run_evaluate(proba, y, LABELS, ["how do I top up"] * len(y))
    curves = {
        "risk_coverage": risk_coverage(proba.max(1), proba.argmax(1) == y)[0],
        "roc": roc_points(proba.max(1), proba.argmax(1) != y, False),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        evaluate.write_reports(paths, result, result["metrics"], "hwu64")
        calibrate.write_outputs(
            paths, {"calibration": {"ood": {}}, "stats": {}, "metrics": {}, "plots": curves}
        )
    proc = run(["dvc", "plots", "show", "--json"], root)
    out = json.loads(proc.stdout)
    assert not out.get("errors"), out["errors"]
    return out["data"]


def declared_plots() -> list:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]


def only(shown: dict, prefix: str) -> dict:
    (plot,) = [v for k, v in shown.items() if k.startswith(prefix)]
    return plot[0]


def test_every_declared_plot_renders(shown):
    assert len(shown) == len(declared_plots())
    for plot_id, renders in shown.items():
        assert renders, plot_id
        for r in renders:
            assert r["type"] in ("vega", "image"), plot_id
            if r["type"] == "vega":
                assert r["content"]["data"]["values"], plot_id


def test_the_normalised_confusion_matrix_is_an_image_next_to_the_confusion_template(shown):
    assert only(shown, "Confusion matrix")["type"] == "vega"
    (image,) = [v[0] for k, v in shown.items() if k.endswith("confusion_normalised.png")]
    assert image["type"] == "image"


def test_the_reliability_diagram_has_the_y_equals_x_diagonal(shown):
    spec = only(shown, "Reliability diagram")["content"]
    (rule,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule"]
    assert [rule["encoding"][c]["datum"] for c in ("x", "y", "x2", "y2")] == [0, 0, 1, 1]
    (curve,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "line"]
    assert (curve["encoding"]["x"]["field"], curve["encoding"]["y"]["field"]) == ("confidence", "accuracy")


def test_the_confidence_histogram_shows_correct_and_wrong(shown):
    spec = only(shown, "Confidence histogram")["content"]
    (fold,) = [t["fold"] for t in spec["transform"] if "fold" in t]
    assert fold == ["correct", "wrong"]
    assert spec["encoding"]["color"]["scale"]["domain"] == ["correct", "wrong"]
    rows = spec["data"]["values"]
    assert all(r["correct"] + r["wrong"] == r["count"] for r in rows)
    assert sum(r["wrong"] for r in rows) > 0


def test_no_plot_title_names_a_dataset_but_through_config(shown):
    """Titles take the dataset from params (data.name), never a name written into dvc.yaml."""
    text = (ROOT / "dvc.yaml").read_text()
    plots = text[text.index("\nplots:") :]
    assert not re.search(r"banking|clinc|hwu", plots, re.IGNORECASE)
    data_name = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["name"]
    assert any(data_name in plot_id for plot_id in shown)
