"""The Predictor contract: one set of methods for torch and ONNX bundles, and old torch bundles that still load."""

from __future__ import annotations

import importlib
import inspect
import json

import joblib
import pytest

from intentops.errors import UserError
from intentops.inference.predictor import OnnxPredictor, Predictor, TorchPredictor

CONTRACT = ("outputs", "logits", "predict_proba", "score", "predict", "with_calibration")

# Classes that torch bundles written before the stages/ and inference/ move name in their pickles
# (featurizer.joblib) and in bundle.json's `net._target_`: they must stay importable where they were.
BUNDLE_CLASSES = (
    "intentops.models.minilm_head.EmbeddingTfidfFeaturizer",
    "intentops.models.minilm_head.EmbTfidfHead",
    "intentops.models.tokens.TokenFeaturizer",
    "intentops.models.bilstm.BiLSTMClassifier",
    "intentops.models.minilm_finetune.MiniLMClassifier",
)


@pytest.mark.parametrize("name", CONTRACT)
def test_both_predictors_share_each_method_signature(name):
    base = inspect.signature(getattr(Predictor, name))
    for cls in (TorchPredictor, OnnxPredictor):
        assert inspect.signature(getattr(cls, name)) == base, (
            f"{cls.__name__}.{name} differs from Predictor.{name}"
        )


@pytest.mark.parametrize("path", BUNDLE_CLASSES)
def test_classes_named_by_old_bundles_still_import(path):
    module, _, name = path.rpartition(".")
    assert inspect.isclass(getattr(importlib.import_module(module), name))


def test_a_bundle_naming_code_that_is_gone_gets_a_clear_error(tmp_path):
    meta = {
        "format": "torch",
        "labels": ["a", "b"],
        "net": {"_target_": "intentops.gone.Head"},
        "net_kwargs": {},
    }
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    joblib.dump({"not": "a featurizer"}, tmp_path / "featurizer.joblib")
    with pytest.raises(UserError, match="does not have") as err:
        Predictor.load(tmp_path)
    assert "dvc repro train" in err.value.fix


def test_an_onnx_bundle_refuses_precomputed_embeddings():
    onnx = OnnxPredictor.__new__(OnnxPredictor)
    with pytest.raises(UserError, match="precomputed embeddings"):
        onnx.outputs(["hi"], embeddings=[[0.0]])


@pytest.mark.parametrize(
    ("reason", "out_of_scope", "needs_review"),
    [
        (None, False, False),
        ("low_confidence", False, True),
        ("ambiguous", False, True),
        ("out_of_distribution", True, True),
    ],
)
def test_a_rows_flags_follow_its_reason(reason, out_of_scope, needs_review):
    """`out_of_scope` only for out-of-distribution; `needs_review` for any reason (the review queue takes it)."""
    from intentops.inference.predictor import prediction_row

    row = prediction_row([0.7, 0.2, 0.1], [0, 1], reason, ["a", "b", "c"])
    assert (row["out_of_scope"], row["needs_review"], row["reason"]) == (out_of_scope, needs_review, reason)
    assert [t["intent"] for t in row["top_k"]] == ["a", "b"] and row["intent"] == "a"
