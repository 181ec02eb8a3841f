"""`calibrate` end to end on a tiny model trained without one intent (pseudo out-of-scope), plus DVC plots, the
`evaluate` stage's operating point and the exported bundle's out-of-scope class (~25 s in all)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from intentops.scratch import PLOT_TEMPLATES
from model.conftest import SMALL, TEMPLATES, write_fixture_project
from support import ROOT, run

HELD_OUT = "exchange_rate"
TINY = [*SMALL, "model.max_epochs=15", "model.batch_size=32", "train.patience=15"]


@pytest.fixture(scope="module", params=["unseen", "oos_class"])
def project(request, tmp_path_factory):
    """A project whose model never saw HELD_OUT; its val/test rows are relabelled "oos". With "oos_class" its
    train rows are relabelled "oos" too (CLINC150's oos_train with split.oos_as_class): a 'trained' oos class."""
    from omegaconf import OmegaConf

    from intentops.config import compose
    from intentops.io import write_json
    from intentops.stages import calibrate
    from intentops.training import train_from_config

    root = tmp_path_factory.mktemp("oos") / "repo"
    root.mkdir()
    cfg = compose([*TINY, "calibrate.target.oos_recall=0.6"])
    OmegaConf.save(cfg, root / "params.yaml")
    write_fixture_project(root, cfg)
    for split in ("train", "val", "test"):
        frame = pd.read_parquet(root / cfg.paths[split])
        held = (frame["label"] == HELD_OUT).to_numpy()
        if split == "train" and request.param == "unseen":
            emb_path = root / cfg.paths.embeddings_dir / "train.npy"
            np.save(emb_path, np.load(emb_path)[~held])
            frame = frame[~held]
        else:
            frame.loc[held, "label"] = "oos"
        frame.reset_index(drop=True).to_parquet(root / cfg.paths[split], index=False)
    write_json(
        root / cfg.paths.taxonomy, {"labels": [x for x in TEMPLATES if x != HELD_OUT], "oos_label": "oos"}
    )
    train_from_config(cfg, root / cfg.paths.model_dir, root / "work", root=root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        calibrate.main()
    return root, cfg


def test_calibration_file_and_postprocess_contract(project):
    from intentops.inference.ood import load_calibration, postprocess
    from intentops.inference.predictor import Predictor

    root, cfg = project
    cal = json.loads((root / cfg.paths.calibration).read_text())
    assert cal["oos_label"] == "oos" and cal["temperature"] > 0
    assert cal["ood"]["method"] == cfg.calibrate.method and isinstance(cal["ood"]["higher_is_ood"], bool)
    assert cal["review"] == {
        "min_confidence": cfg.calibrate.review.min_confidence,
        "min_margin": cfg.calibrate.review.min_margin,
    }
    metrics = json.loads((root / cfg.paths.calibrate_metrics).read_text())
    assert metrics["val"]["oos_recall"] >= 0.6
    assert {"ece_before", "ece_after", "oos_auroc", "oos_fpr_at_95_tpr", "in_scope_accuracy"} <= set(
        metrics["test"]
    )
    # What serving does: logits from the bundle, then postprocess with the stage's file.
    predictor = Predictor.load(root / cfg.paths.model_dir)
    test = pd.read_parquet(root / cfg.paths.test)
    logits = predictor.logits(test["text"].tolist())  # re-encodes: no embeddings passed
    out = postprocess(logits, load_calibration(root / cfg.paths.calibration))
    oos = (test["label"] == "oos").to_numpy()
    assert out["out_of_scope"][oos].mean() == pytest.approx(metrics["test"]["oos_recall"], abs=0.02)
    if "oos" in predictor.labels:  # trained as a class: its column is skipped by the score, its rows flagged
        assert cal["oos_index"] == predictor.labels.index("oos")
        as_oos = out["pred"] == cal["oos_index"]
        assert as_oos[oos].mean() > 0.5 and out["out_of_scope"][as_oos].all()
    else:
        assert cal["oos_index"] is None
    np.testing.assert_allclose(out["proba"].sum(axis=1), 1, rtol=1e-5)


def test_dvc_plots_show_renders_calibrate_plots(project):
    root, _ = project
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    run(["dvc", "init", "--no-scm", "-q"], root)
    shutil.copytree(ROOT / PLOT_TEMPLATES, root / PLOT_TEMPLATES)
    proc = run(["dvc", "plots", "show", "--json"], root)
    shown = json.loads(proc.stdout)["data"]
    for title, x, y in (("Risk-coverage", "coverage", "risk"), ("Out-of-scope ROC", "fpr", "tpr")):
        (plot,) = [v for k, v in shown.items() if k.startswith(title)]
        values = plot[0]["content"]["data"]["values"]
        assert len(values) > 2 and {x, y} <= set(values[0]), f"{title}: {values[:2]}"


def test_evaluate_reports_in_scope_accuracy_and_oos_recall_at_the_operating_point(project):
    """`evaluate` re-encodes test through the Predictor and applies calibration.json: the same operating point
    as `calibrate` measured on the stage's embeddings, over every in-scope and every out-of-scope row."""
    from intentops.stages import evaluate

    root, cfg = project
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        evaluate.main()
    point = json.loads((root / cfg.paths.eval_metrics).read_text())["operating_point"]
    fitted = json.loads((root / cfg.paths.calibrate_metrics).read_text())["test"]
    test = pd.read_parquet(root / cfg.paths.test)
    n_oos = int((test["label"] == "oos").sum())
    assert (point["n_in_scope"], point["n_oos"]) == (len(test) - n_oos, n_oos) and n_oos > 0
    assert point["method"] == cfg.calibrate.method and point["threshold"] == fitted.get(
        "threshold", point["threshold"]
    )
    for key in ("in_scope_accuracy", "oos_recall", "coverage", "oos_auroc"):
        assert point[key] == pytest.approx(fitted[key], abs=0.02), key
    report = (root / cfg.paths.error_analysis).read_text()
    assert "## Operating point" in report and f"OOS recall {point['oos_recall']:.4f}" in report
    # A trained oos class reports the deployed detector (class + score) and the score alone.
    labels = json.loads((root / cfg.paths.model_dir / "bundle.json").read_text())["labels"]
    assert ("oos_score_only_auroc" in point) == ("oos" in labels)


def test_exported_bundle_keeps_the_trained_oos_class(project):
    """The ONNX bundle carries `oos_index`: a top-1 on the oos class is served as out_of_distribution."""
    from intentops.inference.predictor import Predictor
    from intentops.stages import export

    root, cfg = project
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        export.main()
    bundle = Predictor.load(root / cfg.paths.bundle_dir)
    cal = json.loads((root / cfg.paths.bundle_dir / "calibration.json").read_text())
    assert cal["oos_index"] == (bundle.labels.index("oos") if "oos" in bundle.labels else None)
    oos_texts = pd.read_parquet(root / cfg.paths.test).query("label == 'oos'")["text"].tolist()
    out = bundle.predict(oos_texts)
    assert sum(r["out_of_scope"] for r in out) / len(out) >= 0.5
    for r in out:
        if r["intent"] == "oos":  # only possible with the class; never served as an in-scope answer
            assert (r["out_of_scope"], r["reason"]) == (True, "out_of_distribution")
    # The int8 graph keeps fp32's calibration when it holds for it on val (the check in metrics.json), else it
    # has its own temperature and threshold, fitted on its val outputs for the same target; loading the int8
    # variant applies what the bundle holds, and fp32 keeps the `calibrate` stage's either way.
    metrics = json.loads((root / cfg.paths.export_metrics).read_text())["int8"]
    check = metrics["calibration_check_val"]
    assert 0 <= check["int8_under_fp32_on_val"]["oos_recall"] <= 1
    int8 = Predictor.load(root / cfg.paths.bundle_dir, variant="int8")
    own = (cal.get("variants") or {}).get("int8")
    assert (own is None) == check["fp32_calibration_holds"], (own, check)
    expected = own or {"temperature": cal["temperature"], "threshold": cal["ood"]["threshold"]}
    assert int8.calibration["temperature"] == expected["temperature"] > 0
    assert int8.calibration["ood"]["threshold"] == expected["threshold"]
    assert (
        bundle.calibration["ood"]["threshold"]
        == json.loads((root / cfg.paths.calibration).read_text())["ood"]["threshold"]
    )
    report = metrics["calibration"]
    assert report["temperature"] == round(expected["temperature"], 4) and 0 <= report["oos_recall"] <= 1
