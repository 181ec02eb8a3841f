"""Pure functions of the modelling stages: metrics, batching, label space, evaluation tables, baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from intentops.data.taxonomy import Taxonomy
from intentops.errors import UserError
from intentops.metrics import classification_summary, expected_calibration_error, reliability_bins
from intentops.models.data import slice_batch
from intentops.models.labels import encode_labels, label_space
from intentops.stages.evaluate import (
    confidence_histogram,
    confused_pairs,
    per_class_report,
    run_evaluate,
    slice_metrics,
)


def test_ece_zero_when_confidence_matches_accuracy():
    # Four predictions at confidence 0.75, three right: perfectly calibrated.
    proba = np.array([[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(proba, y) == pytest.approx(0.0)


def test_ece_of_overconfident_model():
    proba = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 5 + [1] * 5)  # 50 % right at 90 % confidence
    assert expected_calibration_error(proba, y) == pytest.approx(0.4)
    (row,) = reliability_bins(proba, y)
    assert row["count"] == 10 and row["accuracy"] == 0.5 and row["confidence"] == pytest.approx(0.9)


def test_classification_summary():
    out = classification_summary(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert out["accuracy"] == 0.75
    assert out["macro_f1"] == pytest.approx(np.mean([1.0, 2 / 3, 2 / 3]))


def test_slice_batch_densifies_sparse_and_trims_padding():
    feats = {
        "tfidf": sp.csr_matrix(np.eye(4, dtype=np.float32)),
        "input_ids": np.array([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 0], [1, 0, 0, 0]]),
        "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]),
    }
    batch = slice_batch(feats, np.array([0, 1]))
    assert batch["tfidf"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert batch["input_ids"].shape == (2, 2)  # longest sequence in this batch is 2
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_label_space_adds_oos_only_when_trained_on():
    tax = Taxonomy(("a", "b"), oos_label="oos")
    assert label_space(tax, pd.Series(["a", "b"])) == ["a", "b"]
    assert label_space(tax, pd.Series(["a", "oos"])) == ["a", "b", "oos"]
    with pytest.raises(UserError, match="missing from the taxonomy"):
        label_space(tax, pd.Series(["a", "zzz"]))


def test_encode_labels_drops_unknown_rows():
    frame = pd.DataFrame({"text": ["x", "y", "z"], "label": ["b", "oos", "a"]})
    rows, ids, kept = encode_labels(frame, ["a", "b"])
    assert rows["text"].tolist() == ["x", "z"] and ids.tolist() == [1, 0] and kept.tolist() == [0, 2]


def test_per_class_report_counts_fp_and_fn():
    y_true, y_pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1])
    rep = per_class_report(y_true, y_pred, ["a", "b", "c"]).set_index("intent")
    assert rep.loc["b", "false_positives"] == 2 and rep.loc["b", "false_negatives"] == 0
    assert rep.loc["c", "false_negatives"] == 1 and rep.loc["c", "f1"] == 0.0
    assert rep["false_positives"].sum() == rep["false_negatives"].sum() == 2


def test_confused_pairs_ranked_with_examples():
    y_true = np.array([0, 0, 0, 1, 2])
    y_pred = np.array([1, 1, 0, 1, 0])
    pairs = confused_pairs(y_true, y_pred, ["a", "b", "c"], ["t1", "t2", "t3", "t4", "t5"])
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2, "examples": ["t1", "t2"]}
    assert pairs[1]["true"] == "c" and pairs[1]["count"] == 1


def test_slices_by_length_digits_and_amounts():
    texts = ["hi", "i paid £20 twice", "card number 1234 please check now thanks a lot friend"]
    out = {s["slice"]: s for s in slice_metrics(texts, np.array([0, 1, 1]), np.array([0, 0, 1]))}
    assert out["has digits"]["n"] == 2 and out["has digits"]["accuracy"] == 0.5
    assert out["has amount"]["n"] == 1 and out["has amount"]["accuracy"] == 0.0
    assert out["words 0-5"]["n"] == 2 and out["words 6-10"]["n"] == 1


def test_run_evaluate_tables_agree():
    proba = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    result = run_evaluate(proba, np.array([0, 1, 1]), ["a", "b"], ["x", "y", "z"])
    assert result["metrics"]["test"]["accuracy"] == pytest.approx(2 / 3)
    assert len(result["confusion"]) == 3 and result["confusion"][2] == {"actual": "b", "predicted": "a"}
    hist = confidence_histogram(result["confidence"])
    assert sum(h["count"] for h in hist) == 3 and sum(h["wrong"] for h in hist) == 1


def test_baseline_separates_clear_intents():
    from intentops.stages.baseline import run_baseline

    train = pd.DataFrame(
        {
            "text": [
                "lost my card",
                "card stolen",
                "my card is lost",
                "top up failed",
                "top up declined",
                "cannot top up",
            ],
            "label": ["lost"] * 3 + ["topup"] * 3,
        }
    )
    test = pd.DataFrame({"text": ["stolen card", "top up did not work"], "label": ["lost", "topup"]})
    out = run_baseline(train, test, {"word_ngram": [1, 2], "char_ngram": [2, 4]}, C=1.0)
    assert out["test"]["accuracy"] == 1.0 and out["n_features"] > 0


def test_head_memory_term_is_a_per_class_soft_nearest_neighbour_vote():
    import torch
    from scipy.special import logsumexp

    from intentops.models.minilm_head import EmbTfidfHead

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(12, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    query = bank[[0, 5]] + 0.05 * rng.normal(size=(2, 8)).astype(np.float32)
    head = EmbTfidfHead(emb_dim=8, tfidf_dim=3, n_classes=3, knn_weight=2.0, knn_tau=0.05)
    tfidf = torch.zeros(2, 3)
    plain = head(torch.from_numpy(query), tfidf)
    assert head.attach_memory(bank, labels) == 12
    with torch.no_grad():
        got = head(torch.from_numpy(query), tfidf) - plain
    sims = query @ bank.T / 0.05
    expected = np.stack([0.05 * logsumexp(sims[:, labels == c], axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(got.numpy(), 2.0 * expected, rtol=1e-5, atol=1e-5)
    assert got.numpy().argmax(1).tolist() == [0, 2]  # each query sits next to a row of its class
    # A bundle records bank_size, so a fresh head of that size takes the saved state (buffers included).
    fresh = EmbTfidfHead(emb_dim=8, tfidf_dim=3, n_classes=3, knn_weight=2.0, knn_tau=0.05, bank_size=12)
    fresh.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(torch.from_numpy(query), tfidf), head(torch.from_numpy(query), tfidf))


def test_fit_memory_picks_the_weight_on_val_and_drops_an_unused_memory():
    import torch

    from intentops.models.minilm_head import EmbTfidfHead
    from intentops.training import fit_memory

    rng = np.random.default_rng(1)
    centres = np.eye(3, 6, dtype=np.float32)
    train_y, val_y = np.repeat(np.arange(3), 4), np.arange(3)
    noise = lambda n: 0.1 * rng.normal(size=(n, 6)).astype(np.float32)  # noqa: E731
    features = {
        split: {"emb": centres[y] + noise(len(y)), "tfidf": sp.csr_matrix(np.zeros((len(y), 2), np.float32))}
        for split, y in (("train", train_y), ("val", val_y))
    }
    ids = {"train": train_y, "val": val_y}
    kwargs = {"emb_dim": 6, "tfidf_dim": 2, "n_classes": 3}

    # A head that knows nothing (all logits equal): the memory alone sorts val out, so a weight > 0 wins.
    blind = EmbTfidfHead(**kwargs)
    torch.nn.init.zeros_(blind.layers[-1].weight), torch.nn.init.zeros_(blind.layers[-1].bias)
    saved, info = fit_memory(blind, features, ids, kwargs, [0.0, 1.0, 5.0])
    assert info["weight"] == 1.0  # 1 and 5 both reach 100 %: the smaller wins
    assert info["val_accuracy"]["1.0"] == 1.0 and saved["bank_size"] == 12 and blind.knn_weight == 1.0

    # A head already right on val gains nothing: weight 0, and the memory is not kept in the bundle.
    right = EmbTfidfHead(**kwargs, emb_scale=1.0)
    with torch.no_grad():
        right.layers[-1].weight.zero_()
        right.layers[-1].weight[:, :6] = torch.from_numpy(10 * centres)
        right.layers[-1].bias.zero_()
    saved, info = fit_memory(right, features, ids, kwargs, [0.0, 1.0])
    assert info["weight"] == 0.0 and saved["bank_size"] == 0 and len(right.bank) == 0
    assert fit_memory(right, features, ids, kwargs, []) == (kwargs, None)  # no grid: no memory
