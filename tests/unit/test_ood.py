"""Pure out-of-scope and calibration functions: temperature fit, thresholds, metrics, postprocess."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from intentops.inference.ood import (
    choose_threshold,
    detection_metrics,
    energy_score,
    fit_mahalanobis,
    fit_temperature,
    is_ood,
    knn_score,
    mahalanobis_score,
    postprocess,
    risk_coverage,
    roc_points,
    softmax,
)


def sample_with_temperature(n: int, k: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): the NLL-optimal temperature is true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, k))
    p = softmax(logits, true_t).astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(true_t):
    logits, y = sample_with_temperature(4000, 10, true_t)
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.1)


def test_energy_matches_definition_and_ranks_flat_logits_as_ood():
    logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    t = 2.0
    expected = -t * np.log(np.exp(logits / t).sum(axis=1))
    np.testing.assert_allclose(energy_score(logits, t), expected)
    assert energy_score(logits)[1] > energy_score(logits)[0]


def test_oos_recall_threshold_meets_target_on_synthetic_scores():
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0, 1, 900), rng.normal(2, 1, 100)]  # higher = more OOD
    is_oos = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    for target in (0.5, 0.6, 0.95):
        t = choose_threshold(scores, is_oos, ~is_oos, True, {"oos_recall": target})
        recall = is_ood(scores[is_oos], t, True).mean()
        assert target <= recall < target + 0.02  # meets it, and no more aggressive than one row beyond


def test_threshold_works_for_lower_is_ood_scores():
    rng = np.random.default_rng(2)
    conf = np.r_[rng.uniform(0.5, 1, 500), rng.uniform(0, 0.7, 50)]  # msp: low = OOD
    is_oos = np.r_[np.zeros(500, bool), np.ones(50, bool)]
    t = choose_threshold(conf, is_oos, ~is_oos, False, {"oos_recall": 0.6})
    assert is_ood(conf[is_oos], t, False).mean() >= 0.6
    assert not is_ood(np.array([0.99]), t, False)[0]


def test_in_scope_precision_and_coverage_targets():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0, 1, 2000)
    correct = rng.uniform(0, 1, 2000) < conf  # right more often when confident
    none = np.zeros(2000, bool)
    t = choose_threshold(conf, none, correct, False, {"in_scope_precision": 0.9})
    accepted = ~is_ood(conf, t, False)
    assert correct[accepted].mean() >= 0.9
    # the most permissive such cut: accepting the next most confident rejected row would break the target
    next_row = np.argmax(np.where(accepted, -np.inf, conf))
    widened = accepted | (conf >= conf[next_row])
    assert correct[widened].mean() < 0.9
    t = choose_threshold(conf, none, correct, False, {"coverage": 0.8})
    assert (~is_ood(conf, t, False)).mean() == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="target"):
        choose_threshold(conf, none, correct, False, {"recall": 0.5})
    with pytest.raises(ValueError, match="out-of-scope rows"):
        choose_threshold(conf, none, correct, False, {"oos_recall": 0.5})


def test_detection_metrics_agree_with_sklearn():
    rng = np.random.default_rng(4)
    positive = rng.uniform(size=3000) < 0.2
    scores = rng.normal(size=3000) + 1.5 * positive
    m = detection_metrics(scores, positive, higher_is_positive=True)
    assert m["auroc"] == pytest.approx(roc_auc_score(positive, scores))
    fpr, tpr, _ = roc_curve(positive, scores)
    assert m["fpr_at_95_tpr"] == pytest.approx(fpr[tpr >= 0.95].min())
    flipped = detection_metrics(-scores, positive, higher_is_positive=False)
    assert flipped == pytest.approx(m)
    points = roc_points(scores, positive, True, n=50)
    assert (
        len(points) <= 50 and points[0] == {"fpr": 0.0, "tpr": 0.0} and points[-1] == {"fpr": 1.0, "tpr": 1.0}
    )


def test_risk_coverage_curve():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, False])
    points, aurc = risk_coverage(conf, correct)
    assert [p["risk"] for p in points] == [0.0, 0.0, pytest.approx(1 / 3, abs=1e-4), 0.5]
    assert points[-1]["coverage"] == 1.0
    assert aurc == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)


def test_embedding_scores_flag_far_points():
    rng = np.random.default_rng(5)
    centres = np.eye(8)[:3] * 3
    y = np.repeat(np.arange(3), 50)
    train = centres[y] + rng.normal(0, 0.3, (150, 8))
    stats = fit_mahalanobis(train, y)
    near, far = centres[:1] + 0.1, -centres[:1]
    assert mahalanobis_score(far, **stats)[0] > mahalanobis_score(near, **stats)[0]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    bank = unit(train)
    assert knn_score(unit(far), bank, k=5)[0] > knn_score(unit(near), bank, k=5)[0]


def calibration(method="msp", threshold=0.3, higher_is_ood=False, t=1.0):
    return {
        "temperature": t,
        "ood": {"method": method, "threshold": threshold, "higher_is_ood": higher_is_ood},
        "review": {"min_confidence": 0.5, "min_margin": 0.2},
        "oos_label": "oos",
    }


def test_postprocess_reasons_and_flags():
    logits = np.log(
        np.array(
            [
                [0.90, 0.05, 0.05],  # confident: no reason
                [0.45, 0.40, 0.15],  # top-1 < 0.5: low_confidence (also ambiguous; low_confidence wins)
                [0.55, 0.40, 0.05],  # margin 0.15 < 0.2: ambiguous
                [0.30, 0.30, 0.40],  # msp 0.40 <= 0.42: out_of_distribution wins over low_confidence
                [0.20, 0.20, 0.60],
            ]
        )
    )
    out = postprocess(logits, calibration(threshold=0.42))
    assert out["reason"].tolist() == [None, "low_confidence", "ambiguous", "out_of_distribution", None]
    assert out["out_of_scope"].tolist() == [False, False, False, True, False]
    assert out["needs_review"].tolist() == [False, True, True, True, False]
    np.testing.assert_allclose(out["proba"].sum(axis=1), 1.0, rtol=1e-5)
    assert out["pred"].tolist() == [0, 0, 0, 2, 2]
    np.testing.assert_allclose(out["ood_score"], out["proba"].max(axis=1), rtol=1e-6)


def test_postprocess_applies_temperature_and_energy():
    logits = np.array([[4.0, 0.0, 0.0], [0.5, 0.4, 0.3]])
    out = postprocess(logits, calibration("energy", threshold=-3.0, higher_is_ood=True, t=2.0))
    np.testing.assert_allclose(out["proba"], softmax(logits, 2.0), rtol=1e-6)
    np.testing.assert_allclose(out["ood_score"], energy_score(logits, 2.0))
    assert out["out_of_scope"].tolist() == [False, True]


def test_postprocess_without_ood_and_embedding_methods_need_embeddings():
    logits = np.array([[2.0, 0.0]])
    out = postprocess(logits, {"temperature": 1.0})
    assert not out["out_of_scope"].any() and out["reason"].tolist() == [None]
    with pytest.raises(ValueError, match="embeddings"):
        postprocess(logits, calibration("knn", 0.5, True))


def test_postprocess_with_an_oos_class_flags_its_rows_and_scores_in_scope_columns_only():
    # Column 1 is a trained out-of-scope class (CLINC150 with split.oos_as_class).
    logits = np.array(
        [
            [6.0, 0.0, 0.0],  # confident in-scope: accepted
            [0.0, 6.0, 0.0],  # top-1 is the oos class: flagged whatever its energy
            [0.5, 0.0, 0.4],  # flat over the in-scope columns: flagged by energy
        ]
    )
    cal = {**calibration("energy", threshold=-2.0, higher_is_ood=True), "oos_index": 1}
    out = postprocess(logits, cal)
    np.testing.assert_allclose(out["ood_score"], energy_score(logits[:, [0, 2]]))
    # Scored over all columns, row 1 would look in-scope (energy -6.0): the oos column must not count.
    assert energy_score(logits)[1] < -2.0 < out["ood_score"][1]
    assert out["out_of_scope"].tolist() == [False, True, True]
    assert out["reason"].tolist() == [None, "out_of_distribution", "out_of_distribution"]
    assert out["pred"].tolist() == [0, 1, 0]
    # Without an out-of-scope method, the class alone still flags its rows.
    out = postprocess(logits, {"temperature": 1.0, "oos_index": 1})
    assert out["out_of_scope"].tolist() == [False, True, False]


def test_detection_score_ranks_rows_the_oos_class_flags_as_most_out_of_scope():
    from intentops.inference.ood import detection_score

    out = {"ood_score": np.array([-8.0, -1.0, -7.0, -2.0]), "pred": np.array([0, 1, 1, 2])}
    # Higher is OOD: the two oos-class rows (pred 1) go above every score, the others keep theirs.
    got = detection_score(out, True, oos_index=1)
    assert got[[0, 3]].tolist() == [-8.0, -2.0] and (got[[1, 2]] > out["ood_score"].max()).all()
    # Lower is OOD (msp): below every score instead.
    low = detection_score({"ood_score": np.array([0.9, 0.2, 0.8]), "pred": np.array([0, 1, 0])}, False, 1)
    assert low[1] < 0.2 and low[[0, 2]].tolist() == [0.9, 0.8]
    # Without a trained class, the score itself: the AUROC of a class that catches a row its score misses rises.
    np.testing.assert_array_equal(detection_score(out, True, None), out["ood_score"])
    is_oos = np.array([False, False, True, True])
    assert (
        detection_metrics(got, is_oos, True)["auroc"]
        > detection_metrics(out["ood_score"], is_oos, True)["auroc"]
    )


def test_oos_recall_threshold_counts_rows_already_flagged():
    rng = np.random.default_rng(3)
    scores = np.r_[rng.normal(0, 1, 900), rng.normal(2, 1, 100)]
    is_oos = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    flagged = np.zeros(1000, bool)
    flagged[900:930] = True  # 30 of the 100 out-of-scope rows caught by the oos class
    t = choose_threshold(scores, is_oos, ~is_oos, True, {"oos_recall": 0.6}, flagged)
    union = is_ood(scores, t, True) | flagged
    assert union[is_oos].sum() == 60  # exactly the target: 30 by the class + 30 more by the score
    plain = choose_threshold(scores, is_oos, ~is_oos, True, {"oos_recall": 0.6})
    assert t > plain  # less aggressive than ignoring the class
    # The class alone meets the target: the score flags nothing.
    t = choose_threshold(scores, is_oos, ~is_oos, True, {"oos_recall": 0.25}, flagged)
    assert not is_ood(scores, t, True).any()
    t = choose_threshold(-scores, is_oos, ~is_oos, False, {"oos_recall": 0.25}, flagged)
    assert not is_ood(-scores, t, False).any()


def test_one_meaning_per_field_out_of_scope_only_out_of_distribution_needs_review_any_reason():
    """out_of_scope: out of distribution only (a trained oos class's top-1 included); needs_review: any reason."""
    from intentops.inference.predictor import prediction_row

    logits = np.log(
        np.array(
            [
                [0.90, 0.05, 0.05],  # calm: routed
                [0.45, 0.40, 0.15],  # low_confidence
                [0.55, 0.40, 0.05],  # ambiguous
                [0.05, 0.90, 0.05],  # confident, but its top-1 is the trained out-of-scope class (column 1)
            ]
        )
    )
    cal = {"temperature": 1.0, "oos_index": 1, "review": {"min_confidence": 0.5, "min_margin": 0.2}}
    out = postprocess(logits, cal)
    assert out["reason"].tolist() == [None, "low_confidence", "ambiguous", "out_of_distribution"]
    assert out["out_of_scope"].tolist() == [False, False, False, True]
    assert out["needs_review"].tolist() == [False, True, True, True]
    rows = [
        prediction_row(p, [int(np.argmax(p))], r, ["a", "oos", "c"])
        for p, r in zip(out["proba"].tolist(), out["reason"].tolist(), strict=True)
    ]
    flags = [(r["out_of_scope"], r["needs_review"], r["reason"]) for r in rows]
    assert flags == [
        (False, False, None),
        (False, True, "low_confidence"),
        (False, True, "ambiguous"),
        (True, True, "out_of_distribution"),
    ]
