"""The export stage end to end on a tiny model trained here: ONNX bundle, parity with PyTorch, int8, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# The modelling tests' fixture data writer, so that every model test trains on the same small dataset.
from model.conftest import SMALL, write_fixture_project

TINY = [
    *SMALL,
    "model.max_epochs=15",
    "model.batch_size=32",
    "train.patience=15",
    "export.batch_size=16",
    "export.latency_calls=5",
    "promote.latency_calls=10",
    "promote.warmup_calls=2",
    "promote.n_boot=200",
    "promote.latency_budget_ms=1000",
]


def tiny_project(root: Path, overrides: list[str] = ()):
    """A project folder (params.yaml, fixture data, a trained `minilm_head` bundle) at `root`; returns its cfg."""
    from omegaconf import OmegaConf

    from intentops.config import compose
    from intentops.io import write_json
    from intentops.training import train_from_config

    cfg = compose([*TINY, *overrides])
    root.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, root / "params.yaml")
    write_fixture_project(root, cfg)
    metrics = train_from_config(cfg, root / cfg.paths.model_dir, root / "work", root=root)
    write_json(root / cfg.paths.train_metrics, metrics)
    return cfg


def set_params(root: Path, overrides: list[str]):
    """Recompose params.yaml with more overrides, as `intentops params` would."""
    from omegaconf import OmegaConf

    from intentops.config import compose

    cfg = compose([*TINY, *overrides])
    OmegaConf.save(cfg, root / "params.yaml")
    return cfg


def run_stage(module, root: Path) -> None:
    """Run a stage's real `main()` in-process from the project root (as `python -m intentops.<stage>` does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        module.main()


def exported_project(tmp_path_factory, dest: Path):
    """A copy, at `dest`, of a tiny project that has run `export`; built once per test session."""
    from omegaconf import OmegaConf

    from intentops.stages import export

    base = tmp_path_factory.getbasetemp() / "tiny-exported"
    if not (base / "done").is_file():
        shutil.rmtree(base, ignore_errors=True)
        tiny_project(base)
        run_stage(export, base)
        (base / "done").touch()
    shutil.copytree(base, dest)
    return OmegaConf.load(dest / "params.yaml")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "repo"
    return root, exported_project(tmp_path_factory, root)


def test_bundle_contents(project):
    from intentops.inference.bundle import content_version

    root, cfg = project
    bundle = root / cfg.paths.bundle_dir
    assert {p.name for p in bundle.iterdir()} == {
        "bundle.json",
        "model.onnx",
        "model.int8.onnx",
        "tokenizer.json",
        "tfidf.joblib",
        "labels.json",
        "calibration.json",
        "card.json",
        "model_card.md",
        "manifest.json",
    }
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["format"] == "onnx" and meta["version"] == content_version(bundle)
    assert meta["variants"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    torch_meta = json.loads((root / cfg.paths.model_dir / "bundle.json").read_text())
    assert json.loads((bundle / "labels.json").read_text()) == torch_meta["labels"]
    # No `calibrate` output in this project: temperature 1, export's review thresholds, no out-of-scope method.
    assert json.loads((bundle / "calibration.json").read_text()) == {
        "temperature": 1.0,
        "ood": {},
        "oos_label": None,
        "oos_index": None,
        "review": {"min_confidence": cfg.export.min_confidence, "min_margin": cfg.export.min_margin},
    }
    tok = json.loads((bundle / "tokenizer.json").read_text())
    assert tok["truncation"]["max_length"] == cfg.embed.max_seq_length
    assert tok["padding"]["strategy"] == "BatchLongest"


def test_exported_bundle_verifies_and_a_changed_byte_is_refused(project, tmp_path):
    """The export is sealed: it verifies as its version; one flipped byte in any of these files is refused."""
    from intentops.errors import UserError
    from intentops.inference.bundle import verify_bundle

    root, cfg = project
    bundle = tmp_path / "bundle"
    shutil.copytree(root / cfg.paths.bundle_dir, bundle)
    version = json.loads((bundle / "bundle.json").read_text())["version"]
    assert verify_bundle(bundle, expected_version=version)["version"] == version
    for name in ("bundle.json", "model.onnx", "tfidf.joblib"):
        original = (bundle / name).read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01
        (bundle / name).write_bytes(bytes(changed))
        with pytest.raises(UserError, match="changed: expected sha256") as exc:
            verify_bundle(bundle, expected_version=version)
        assert exc.value.where == str(bundle / name)
        (bundle / name).write_bytes(original)
    verify_bundle(bundle, expected_version=version)


def test_one_onnx_graph_with_dynamic_axes(project):
    import onnx

    root, cfg = project
    model = onnx.load(str(root / cfg.paths.bundle_dir / "model.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert inputs["input_ids"] == inputs["attention_mask"] == ["batch", "sequence"]
    assert inputs["tfidf"][0] == "batch" and inputs["tfidf"][1] > 0
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]


def test_parity_with_pytorch_on_the_test_rows(project):
    from intentops.inference.ood import softmax
    from intentops.inference.predictor import OnnxPredictor, Predictor

    root, cfg = project
    parity = json.loads((root / cfg.paths.export_parity).read_text())
    assert parity["passed"] and parity["argmax_agreement"] == 1.0 and parity["n"] > 0
    texts = pd.read_parquet(root / cfg.paths.test)["text"].tolist() + ["  padded  ", "x", "word " * 300]
    torch_p = Predictor.load(root / cfg.paths.model_dir)
    onnx_p = Predictor.load(root / cfg.paths.bundle_dir)
    assert isinstance(onnx_p, OnnxPredictor) and onnx_p.labels == torch_p.labels
    # Batches of mixed lengths (padding) and a text past max_seq_length (truncation) included.
    np.testing.assert_allclose(
        softmax(onnx_p.logits(texts, batch_size=7)), softmax(torch_p.logits(texts)), atol=1e-4
    )
    # One contract: under the same calibration both predictors mean the same probabilities and the same flags.
    torch_cal = torch_p.with_calibration(onnx_p.calibration)
    np.testing.assert_allclose(onnx_p.predict_proba(texts), torch_cal.predict_proba(texts), atol=1e-4)
    assert [r["intent"] for r in onnx_p.predict(texts)] == [r["intent"] for r in torch_cal.predict(texts)]
    assert torch_p.calibration.get("temperature", 1.0) == 1.0  # the train bundle itself is uncalibrated


def test_predict_api_for_serving(project, tmp_path):
    from intentops.inference.predictor import Predictor

    root, cfg = project
    bundle = root / cfg.paths.bundle_dir
    p = Predictor.load(bundle)
    out = p.predict(["my card was stolen", "hmm"], top_k=2)
    assert [len(r["top_k"]) for r in out] == [2, 2] and all(isinstance(r["needs_review"], bool) for r in out)
    assert (
        out[0]["intent"] == "lost_or_stolen_card" and out[0]["confidence"] == out[0]["top_k"][0]["confidence"]
    )
    assert p.version == json.loads((bundle / "bundle.json").read_text())["version"] == p.card["version"]
    assert p.predict_proba([]).shape == (0, len(p.labels))
    # The temperature divides the logits: a hotter bundle is less confident, same ranking.
    hot = tmp_path / "hot"
    shutil.copytree(bundle, hot)
    (hot / "calibration.json").write_text(
        json.dumps({"temperature": 3.0, "min_confidence": 0.99, "min_margin": 0})
    )
    q = Predictor.load(hot).predict(["my card was stolen"])[0]
    assert q["intent"] == out[0]["intent"] and q["confidence"] < out[0]["confidence"] and q["needs_review"]
    assert (q["out_of_scope"], q["reason"]) == (False, "low_confidence")  # an older bundle's flat calibration


def test_int8_model_loads_predicts_and_is_reported(project):
    from intentops.inference.predictor import OnnxPredictor

    root, cfg = project
    int8 = OnnxPredictor.from_bundle(root / cfg.paths.bundle_dir, variant="int8", intra_op_num_threads=1)
    assert int8.predict(["when will my card arrive"])[0]["intent"] == "card_arrival"
    m = json.loads((root / cfg.paths.export_metrics).read_text())
    for variant in ("torch", "fp32", "int8"):
        assert (
            0 <= m[variant]["accuracy"] <= 1
            and m[variant]["sentences_per_s"] > 0
            and m[variant]["single_ms_p50"] > 0
        )
    assert m["int8"]["bytes"] < m["fp32"]["bytes"] / 2


def test_card_fields(project):
    from intentops.inference.bundle import file_sha256

    root, cfg = project
    card = json.loads((root / cfg.paths.bundle_dir / "card.json").read_text())
    assert card["version"] == json.loads((root / cfg.paths.bundle_dir / "bundle.json").read_text())["version"]
    assert (
        card["model"] == "minilm_head" and card["git_revision"] == "unknown"
    )  # the temp project is no git repo
    assert (
        card["metrics"]["train"]["test"]["accuracy"] > 0.5
        and card["metrics"]["parity"]["argmax_agreement"] == 1.0
    )
    assert card["metrics"]["eval"] == {}  # no evaluate report in this project
    assert card["data"]["sha256"]["test"] == file_sha256(root / cfg.paths.test)
    assert card["params"]["export"]["opset"] == cfg.export.opset and "created" not in card


def test_model_card_says_which_reports_were_missing(project):
    """No `evaluate` or `calibrate` ran in this project: model_card.md still renders, and says so where it matters."""
    from intentops.inference.bundle import file_sha256

    root, cfg = project
    text = (root / cfg.paths.bundle_dir / "model_card.md").read_text()
    train = json.loads((root / cfg.paths.train_metrics).read_text())["test"]
    assert f"| accuracy | {train['accuracy']:.4f} |" in text and "From `train`'s report" in text
    assert "Not available: `evaluate`'s per-intent report was missing" in text
    assert "ECE before and after: not measured" in text and "No out-of-scope detector" in text
    assert "The error analysis was not available" in text and "| int8 |" in text
    assert f"| licence | {cfg.data.licence} |" in text and cfg.data.source_url in text
    assert file_sha256(root / cfg.paths.test) in text and "exported outside a git checkout" in text


@pytest.fixture(scope="module")
def full_project(tmp_path_factory):
    """The exported tiny project after `calibrate` and `evaluate`, exported again: every report the model card
    reads is a real stage output (a copy of the shared project: no training of its own)."""
    from intentops.stages import calibrate, evaluate, export

    root = tmp_path_factory.mktemp("export-card") / "repo"
    cfg = exported_project(tmp_path_factory, root)
    for stage in (calibrate, evaluate, export):
        run_stage(stage, root)
    return root, cfg


def test_model_card_is_filled_from_the_stage_reports(full_project):
    from intentops.inference.bundle import MANIFEST_FILE, file_sha256, verify_bundle

    root, cfg = full_project
    bundle = root / cfg.paths.bundle_dir
    version = verify_bundle(bundle)["version"]
    assert "model_card.md" in json.loads((bundle / "manifest.json").read_text())["files"]
    text = (bundle / "model_card.md").read_text()

    def read(path: str):
        return json.loads((root / path).read_text())

    ev, cal, per_class = (
        read(cfg.paths.eval_metrics),
        read(cfg.paths.calibrate_metrics),
        read(cfg.paths.eval_per_class),
    )
    m, errors = read(cfg.paths.export_metrics), read(cfg.paths.error_analysis_data)
    assert f"# Model card: minilm_head {version}" in text
    assert "not available" not in text.lower() and "not measured" not in text.lower()
    # Data and metrics overall.
    assert f"| source | {cfg.data.name} ({cfg.data.source_url}) |" in text
    assert f"| licence | {cfg.data.licence} |" in text and f"| intents | {len(per_class)} |" in text
    assert f"| accuracy | {ev['test']['accuracy']:.4f} |" in text
    assert f"| macro F1 | {ev['test']['macro_f1']:.4f} |" in text
    # The worst intents, lowest F1 first.
    worst = sorted(per_class, key=lambda r: (r["f1"], r["intent"]))[:10]
    table = text.split("weakest intents")[1].split("## Calibration")[0]
    assert [line.split(" | ")[0][2:] for line in table.splitlines()[4:] if line] == [
        r["intent"] for r in worst
    ]
    # Calibration and the out-of-scope operating point, as calibrate measured them.
    assert f"| test | {cal['test']['ece_before']:.4f} | {cal['test']['ece_after']:.4f} |" in text
    assert f"Method **{cal['method']}**, threshold {cal['threshold']:.4f}, chosen on val rows" in text
    assert f"| test | {cal['test']['n_in_scope']} | 0 | {100 * cal['test']['coverage']:.1f} % |" in text
    # fp32 vs int8, from export's own measurements.
    assert f"| int8 | {m['int8']['accuracy']:.4f} | {m['int8']['macro_f1']:.4f} |" in text
    # Limitations from evaluate's error analysis.
    if errors["pairs"]:
        p = errors["pairs"][0]
        assert f"| {p['true']} | {p['predicted']} | {p['count']} |" in text
    else:
        assert "No intent pair was confused on test." in text
    # How to reproduce: the inputs' hashes, the command.
    for path in (cfg.paths.test, Path(cfg.paths.model_dir) / MANIFEST_FILE, cfg.paths.calibration):
        assert f"| {path} | `{file_sha256(root / path)}` |" in text
    assert "`dvc repro export`" in text


def test_registry_card_prints_a_registered_version_s_card(full_project, tmp_path):
    """`intentops registry card [VERSION]`: the card of a staged version (default: production), verified."""
    import os
    import subprocess
    import sys

    from intentops.inference.registry import Registry

    root, cfg = full_project
    bundle = root / cfg.paths.bundle_dir
    version = json.loads((bundle / "bundle.json").read_text())["version"]
    registry = Registry.at(tmp_path / "registry")
    registry.stage(bundle, version, "test")
    registry.promote(version)
    cli = str(Path(sys.executable).parent / "intentops")
    for args in ([version], []):
        proc = subprocess.run(
            [cli, "registry", "card", *args, "--registry", registry.url],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (bundle / "model_card.md").read_text()


@pytest.mark.slow
def test_failed_parity_fails_the_stage_and_keeps_the_bundle(project):
    from intentops.stages import export

    root, cfg = project
    bundle = root / cfg.paths.bundle_dir
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    set_params(root, ["export.parity_min_argmax_agreement=1.01", "export.quantize=false"])
    try:
        with pytest.raises(SystemExit) as exc:
            run_stage(export, root)
        assert exc.value.code == 2
        assert not json.loads((root / cfg.paths.export_parity).read_text())["passed"]
        assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before
    finally:
        set_params(root, [])


def test_fitted_out_of_scope_calibration_travels_in_the_bundle(tmp_path_factory):
    """models/calibration.json (the `calibrate` stage's kNN fit + its .npz) -> bundle, card and Predictor.predict."""
    from intentops.inference.ood import choose_threshold
    from intentops.inference.predictor import Predictor
    from intentops.io import write_json
    from intentops.stages import export

    root = tmp_path_factory.mktemp("export-ood") / "repo"
    cfg = exported_project(tmp_path_factory, root)
    train_emb = np.load(root / cfg.paths.embeddings_dir / "train.npy")
    bank = train_emb.astype(np.float16)
    with open(root / cfg.paths.calibration_stats, "wb") as fh:
        np.savez(fh, bank=bank)
    val_emb = np.load(root / cfg.paths.embeddings_dir / "val.npy")
    from intentops.inference.ood import knn_score

    scores = knn_score(val_emb, bank, k=3)
    threshold = choose_threshold(
        scores, np.zeros(len(scores), bool), np.ones(len(scores), bool), True, {"coverage": 0.95}
    )
    write_json(
        root / cfg.paths.calibration,
        {
            "temperature": 1.5,
            "oos_label": "oos",
            "review": {"min_confidence": 0.2, "min_margin": 0.0},
            "ood": {
                "method": "knn",
                "threshold": threshold,
                "higher_is_ood": True,
                "k": 3,
                "target": {"coverage": 0.95},
                "stats_file": cfg.paths.calibration_stats.rsplit("/", 1)[-1],
            },
        },
    )
    run_stage(export, root)

    bundle = root / cfg.paths.bundle_dir
    cal = json.loads((bundle / "calibration.json").read_text())
    assert cal["ood"] == {
        "method": "knn",
        "threshold": threshold,
        "higher_is_ood": True,
        "k": 3,
        "target": {"coverage": 0.95},
        "stats_file": "ood_stats.npz",
    }
    assert cal["temperature"] == 1.5 and cal["review"] == {"min_confidence": 0.2, "min_margin": 0.0}
    card = json.loads((bundle / "card.json").read_text())
    assert card["calibration"]["out_of_scope"]["method"] == "knn"
    assert card["calibration"]["out_of_scope"]["threshold"] == threshold
    # The bundle alone scores out-of-scope: the graph's embedding output against the shipped kNN bank.
    p = Predictor.load(bundle)
    inside, outside = p.predict(["my card was stolen", "what is the weather like in paris tomorrow"])
    assert (inside["out_of_scope"], inside["reason"]) == (False, None)
    assert (outside["out_of_scope"], outside["reason"]) == (True, "out_of_distribution")


def test_multi_layer_embedding_exports_with_parity(tmp_path_factory):
    """embed.layers=[-3,-2,-1]: the featurizer and the ONNX graph pool the same three hidden states
    (intentops.models.encoder.pool_layers), so parity holds and the graph's embedding output is 3 x 384 wide."""
    from intentops.inference.predictor import OnnxPredictor, Predictor
    from intentops.stages import export

    root = tmp_path_factory.mktemp("export-layers") / "repo"
    cfg = tiny_project(root, ["embed.layers=[-3,-2,-1]"])
    torch_p = Predictor.load(root / cfg.paths.model_dir)
    assert torch_p.featurizer.layers == [-3, -2, -1] and torch_p.meta["net_kwargs"]["emb_dim"] == 3 * 384
    test = pd.read_parquet(root / cfg.paths.test)["text"].tolist()
    # What the featurizer encodes at serving time is what the fixture wrote for training (unit norm, 1152 wide).
    emb = torch_p.featurizer.encode(test[:8])
    np.testing.assert_allclose(emb, np.load(root / cfg.paths.embeddings_dir / "test.npy")[:8], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    run_stage(export, root)
    parity = json.loads((root / cfg.paths.export_parity).read_text())
    assert parity["passed"] and parity["argmax_agreement"] == 1.0
    onnx = OnnxPredictor.from_bundle(root / cfg.paths.bundle_dir)
    logits, graph_emb = onnx.outputs(test[:8], need_embeddings=True)
    np.testing.assert_allclose(graph_emb, emb, atol=1e-4)
    assert logits.shape == (8, len(torch_p.labels))


def test_int8_graph_quantises_the_encoder_and_keeps_the_head_fp32(project):
    """The quantisation route: MiniLM's weight MatMuls are int8 with 7-bit weights (no u8s8 saturation on
    AVX2), while the head with its nearest-neighbour memory stays fp32."""
    import onnx
    from onnx import numpy_helper

    root, cfg = project
    model = onnx.load(str(root / cfg.paths.bundle_dir / "model.int8.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    integer = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 6 * 6  # per layer: query, key, value, attention output, intermediate, output
    assert all(n.name.startswith("/bert/encoder/") for n in integer)
    for n in integer:
        w = weights[n.input[1]]
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64  # reduce_range: 7-bit weights
    # The linear layer (a Gemm the quantiser rewrites as MatMul + Add), and the memory's when it has one.
    head = [n for n in model.graph.node if n.name.startswith("/head/") and n.op_type == "MatMul"]
    assert "/head/layers/layers.1/Gemm_MatMul" in {n.name for n in head}
    assert all(weights[i].dtype == np.float32 for n in head for i in n.input if i in weights)
    assert not any(n.name.startswith("/head/") and "quant" in n.op_type.lower() for n in model.graph.node)
    m = json.loads((root / cfg.paths.export_metrics).read_text())
    assert m["int8"]["argmax_agreement_with_fp32"] == 1.0 and m["int8"]["max_abs_prob_diff_vs_fp32"] < 0.05


def test_bundle_records_the_int8_check_inside_its_verified_content(project, tmp_path):
    """bundle.json "variant_checks" (what serving reads) matches what export measured, and is sealed with it."""
    from intentops.errors import UserError
    from intentops.inference.bundle import verify_bundle

    root, cfg = project
    bundle = root / cfg.paths.bundle_dir
    meta = json.loads((bundle / "bundle.json").read_text())
    m = json.loads((root / cfg.paths.export_metrics).read_text())
    check = meta["variant_checks"]["int8"]
    assert check == {
        "accuracy": m["int8"]["accuracy"],
        "fp32_accuracy": m["fp32"]["accuracy"],
        "drop_pt": round((m["fp32"]["accuracy"] - m["int8"]["accuracy"]) * 100, 2),
        "max_drop_pt": cfg.export.max_int8_drop,
        "fit": check["drop_pt"] <= cfg.export.max_int8_drop,
    }
    assert check["fit"] is True and cfg.export.max_int8_drop == 0.5
    # Each graph's calibration report, and the int8 graph's under fp32's calibration (the check that it holds).
    for report in (m["fp32"]["calibration"], m["int8"]["calibration"], m["int8"]["calibration_fp32"]):
        assert 0 <= report["ece"] <= 1 and report["temperature"] > 0
    # Editing the check after the fact is refused like any other change to the bundle.
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    meta["variant_checks"]["int8"]["drop_pt"] = 0.01
    (copy / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    with pytest.raises(UserError, match="changed"):
        verify_bundle(copy, expected_version=meta["version"])


def test_max_int8_drop_marks_the_int8_graph_unfit(tmp_path_factory):
    """export.max_int8_drop is the line: below any possible drop, the same graph is recorded unfit."""
    from intentops.inference.bundle import verify_bundle
    from intentops.stages import export

    root = tmp_path_factory.mktemp("export-unfit") / "repo"
    exported_project(tmp_path_factory, root)
    cfg = set_params(root, ["export.max_int8_drop=-100"])
    run_stage(export, root)
    meta = verify_bundle(root / cfg.paths.bundle_dir)
    check = meta["variant_checks"]["int8"]
    assert check["max_drop_pt"] == -100.0 and check["fit"] is False and check["drop_pt"] > -100
