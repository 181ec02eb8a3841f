"""The shadow challenger: its scorer (intentops.api.shadow) on a real registry and SQLite store, the figures and
the promotion rules (intentops.feedback.shadow), and `intentops registry promote` reading them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from intentops.errors import UserError
from intentops.feedback import shadow, store
from support import ROOT, write_tiny_onnx_bundle

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


def row(pid: str, champ: str, chall: str, ms: float = 5.0, conf: tuple[float, float] = (0.9, 0.8)) -> dict:
    return {
        "prediction_id": pid,
        "champion_version": "m-champ",
        "challenger_version": "m-chall",
        "champion_intent": champ,
        "champion_confidence": conf[0],
        "challenger_intent": chall,
        "challenger_confidence": conf[1],
        "challenger_ms": ms,
        "challenger_batch": 1,
        "created_at": datetime.now(UTC),
    }


@pytest.fixture
def rows() -> list[dict]:
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("c", "a"), ("a", "a")]
    return [row(f"p{i}", x, y, ms=float(i + 1)) for i, (x, y) in enumerate(pairs)]


def test_figures_count_agreement_confidence_latency_and_labelled_accuracy(rows):
    labels = {
        "p1": "b",
        "p4": "c",
        "p0": "a",
        "p2": "a",
    }  # p2: both wrong; p1: challenger right; p4: champion
    figs = shadow.figures(rows, labels)
    agree = [r["champion_intent"] == r["challenger_intent"] for r in rows]
    assert figs["rows"] == len(rows) and figs["agreement"] == round(sum(agree) / len(rows), 4)
    by_a = [r["champion_intent"] == r["challenger_intent"] for r in rows if r["champion_intent"] == "a"]
    assert figs["agreement_by_champion_intent"]["a"] == {
        "rows": len(by_a),
        "agreement": round(sum(by_a) / len(by_a), 4),
    }
    assert figs["mean_confidence"] == {"champion": 0.9, "challenger": 0.8}
    ms = sorted(r["challenger_ms"] for r in rows)
    assert figs["challenger_call_ms"]["p50"] in ms and figs["challenger_call_ms"]["p95"] == ms[-1]
    lab = figs["labelled"]
    labelled = [r for r in rows if r["prediction_id"] in labels]
    champ = sum(r["champion_intent"] == labels[r["prediction_id"]] for r in labelled) / len(labelled)
    chall = sum(r["challenger_intent"] == labels[r["prediction_id"]] for r in labelled) / len(labelled)
    assert lab["rows"] == 4 and lab["champion_accuracy"] == champ and lab["challenger_accuracy"] == chall
    assert lab["accuracy_drop"] == round(champ - chall, 4)
    assert lab["disagreements"] == {
        "b": {"rows": 1, "champion": 0, "challenger": 1, "neither": 0},
        "c": {"rows": 1, "champion": 1, "challenger": 0, "neither": 0},
    }


def test_no_rows_gives_empty_figures_and_a_required_rule_refuses():
    figs = shadow.figures([], {})
    assert figs["rows"] == 0 and figs["agreement"] is None and figs["labelled"]["rows"] == 0
    rules = shadow.check_rules({"required": True})
    assert shadow.rule_failures(figs, rules) == ["no shadow rows for this (production, candidate) pair"]
    assert shadow.rule_failures(figs, shadow.check_rules({})) == []  # off by default


def test_rules_name_each_figure_that_misses(rows):
    figs = shadow.figures(rows, {"p1": "a", "p4": "c"})  # challenger wrong on both labelled rows
    rules = shadow.check_rules(
        {"required": True, "min_rows": 10, "min_agreement": 0.9, "min_labelled_rows": 3}
    )
    failures = shadow.rule_failures(figs, rules)
    assert len(failures) == 4
    assert [f.split()[-2] for f in failures] == [
        "min_rows",
        "min_agreement",
        "min_labelled_rows",
        "max_labelled_accuracy_drop",
    ]
    lax = shadow.check_rules(
        {"required": True, "min_rows": 1, "min_agreement": 0.5, "max_labelled_accuracy_drop": 1.0}
    )
    assert shadow.rule_failures(figs, lax) == []


@pytest.mark.parametrize(
    "bad", [{"min_agreement": 1.5}, {"min_rows": -1}, {"required": "yes"}, {"min_agreement": True}, {"x": 1}]
)
def test_bad_rules_are_refused_with_where(bad):
    with pytest.raises(UserError) as err:
        shadow.check_rules(bad)
    assert err.value.where == shadow.RULES_WHERE


def upgraded(db: Path):
    engine = store.make_engine(f"sqlite:///{db}")
    store.upgrade(engine)
    return engine


def label_item(engine, pid: str, label: str) -> None:
    """A review-queue item with a resolved label (adjudicated)."""
    store.enqueue(
        engine,
        [
            {
                "prediction_id": pid,
                "text": "my card",
                "model_version": "m-champ",
                "suggested_intent": label,
                "top_k": [],
                "confidence": 0.4,
                "reason": "low_confidence",
            }
        ],
    )
    store.add_adjudication(engine, pid, "lead", label, "checked")


def test_pair_figures_read_the_store_and_its_resolved_labels(tmp_path, rows, monkeypatch):
    engine = upgraded(tmp_path / "q.db")
    with engine.begin() as conn:
        conn.execute(
            store.shadow_scores.insert(),
            rows + [{**rows[0], "prediction_id": "x", "challenger_version": "m-other"}],
        )
    label_item(engine, "p1", "b")
    engine.dispose()
    monkeypatch.setenv(store.DB_URL_ENV, f"sqlite:///{tmp_path / 'q.db'}")
    params = OmegaConf.create(
        {"paths": {"feedback_db": "unused"}, "feedback": {"label": {"min_annotators": 3}}}
    )
    figs = shadow.pair_figures(params, "m-champ", "m-chall")
    assert figs["rows"] == len(rows) and figs["labelled"]["rows"] == 1
    assert figs["labelled"]["challenger_accuracy"] == 1.0
    assert shadow.pair_figures(params, "m-champ", "m-none")["rows"] == 0
    # Without the project's params (no labelling rules) the rows are read, the labelled figures are not.
    assert shadow.pair_figures(None, "m-champ", "m-chall")["labelled"]["rows"] == 0


def test_no_store_configured_means_no_figures(tmp_path, monkeypatch):
    monkeypatch.delenv(store.DB_URL_ENV, raising=False)
    params = OmegaConf.create({"paths": {"feedback_db": str(tmp_path / "absent.db")}})
    assert shadow.pair_figures(params, "a", "b") is None
    assert not (tmp_path / "absent.db").exists()  # reading never creates the database


# --- intentops registry promote -----------------------------------------------------------------------------
def promote_project(tmp_path: Path, monkeypatch, rules: dict) -> tuple[Path, str, str]:
    """A registry (production v1, candidate v2), a store with shadow rows of the pair, params.yaml with `rules`."""
    from intentops.inference.registry import Registry

    reg = Registry.at(tmp_path / "registry")
    versions = []
    for confident in (True, False):
        versions.append(write_tiny_onnx_bundle(tmp_path / f"b{confident}", LABELS, confident))
    reg.add(tmp_path / "bTrue", versions[0])
    reg.set_production(versions[0], "promote", "first")
    reg.stage(tmp_path / "bFalse", versions[1], "challenger")
    engine = upgraded(tmp_path / "q.db")
    shadow_rows = [
        {
            **row(f"p{i}", "a", "a" if i % 4 else "b"),
            "champion_version": versions[0],
            "challenger_version": versions[1],
        }
        for i in range(20)
    ]
    with engine.begin() as conn:
        conn.execute(store.shadow_scores.insert(), shadow_rows)
    engine.dispose()
    params = OmegaConf.load(ROOT / "params.yaml")
    params.paths.feedback_db = str(tmp_path / "q.db")
    params.paths.promote_gate = str(tmp_path / "reports" / "gate.json")
    params.promote.shadow = rules
    OmegaConf.save(params, tmp_path / "params.yaml")
    monkeypatch.setenv("INTENTOPS_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.delenv(store.DB_URL_ENV, raising=False)
    return tmp_path / "registry", versions[0], versions[1]


def promote(registry: Path) -> int:
    from intentops.cli import main

    try:
        main(["registry", "promote", "--registry", str(registry)])
    except SystemExit as exit:
        return int(exit.code)
    return 0


def test_promote_writes_the_shadow_figures_and_moves_production_with_rules_off(tmp_path, monkeypatch, capsys):
    registry, v1, v2 = promote_project(tmp_path, monkeypatch, {"required": False, "min_agreement": 0.99})
    assert promote(registry) == 0
    report = json.loads((tmp_path / "reports" / "shadow.json").read_text())
    assert (report["champion"], report["challenger"], report["rows"]) == (v1, v2, 20)
    assert report["agreement"] == 0.75 and report["failures"] == []
    assert (registry / "production").read_text().strip() == v2
    assert f"shadow {v1} vs {v2}" in capsys.readouterr().out


def test_promote_refuses_when_required_rules_are_unmet(tmp_path, monkeypatch, capsys):
    registry, v1, _ = promote_project(
        tmp_path, monkeypatch, {"required": True, "min_rows": 10, "min_agreement": 0.9}
    )
    assert promote(registry) == UserError.exit_code
    err = capsys.readouterr().err
    assert "agreement 0.7500 < min_agreement 0.9" in err and "promote.shadow.required: false" in err
    assert (registry / "production").read_text().strip() == v1  # production did not move
    assert json.loads((tmp_path / "reports" / "shadow.json").read_text())["failures"]


def test_shadow_report_command_prints_the_pair_of_production_and_candidate(tmp_path, monkeypatch, capsys):
    from intentops.cli import main

    registry, v1, v2 = promote_project(tmp_path, monkeypatch, {})
    main(["shadow", "report", "--registry", str(registry)])
    out = json.loads(capsys.readouterr().out)
    assert (out["champion"], out["challenger"], out["rows"], out["agreement"]) == (v1, v2, 20, 0.75)


# --- the scorer (intentops.api.shadow) on a real registry --------------------------------------------------
async def run_io(fn, *args):
    return fn(*args)


def scorer_for(tmp_path: Path, candidate_ok: bool = True, queue_max: int = 100):
    """A ShadowScorer on real settings over a registry with production and a staged candidate."""
    from intentops.api.settings import load_settings
    from intentops.api.shadow import ShadowScorer
    from intentops.inference.bundle import MANIFEST_FILE
    from intentops.inference.registry import Registry

    reg = Registry.at(tmp_path / "registry")
    v1 = write_tiny_onnx_bundle(tmp_path / "b1", LABELS, True)
    v2 = write_tiny_onnx_bundle(tmp_path / "b2", LABELS, False)
    reg.add(tmp_path / "b1", v1)
    reg.set_production(v1, "promote", "first")
    reg.stage(tmp_path / "b2", v2, "challenger")
    if not candidate_ok:  # a file changed after staging: the manifest no longer verifies
        (tmp_path / "registry" / v2 / "labels.json").write_text(json.dumps(LABELS[::-1]))
    assert (tmp_path / "registry" / v2 / MANIFEST_FILE).is_file()
    settings, _ = load_settings(
        ROOT,
        {
            "registry": str(tmp_path / "registry"),
            "shadow": {"enabled": True, "sample": 1.0, "queue_max": queue_max, "batch_size": 4},
        },
    )
    scorer = ShadowScorer(ROOT, lambda: settings, run_io)
    scorer.configure(settings["shadow"])
    return scorer, v1, v2


def champion_rows(n: int, version: str) -> list[dict]:
    return [
        {"prediction_id": f"id{i}", "intent": LABELS[0], "confidence": 0.95, "model_version": version}
        for i in range(n)
    ]


def test_scorer_follows_the_candidate_scores_a_sample_and_stores_it(tmp_path):
    scorer, v1, v2 = scorer_for(tmp_path)
    asyncio.run(scorer.follow())
    assert scorer.model is not None and scorer.candidate == v2
    rows = champion_rows(10, v1)
    before = json.dumps(rows)
    scorer.offer(["my card has not arrived"] * 10, rows)
    assert json.dumps(rows) == before  # the champion's rows are not touched
    assert scorer.score_queued() == 10 and not scorer.queue
    engine = upgraded(tmp_path / "q.db")
    assert scorer.write_some(engine) == 10 and not scorer.rows
    stored = store.table_rows(engine, store.shadow_scores)
    engine.dispose()
    assert {(r["champion_version"], r["challenger_version"]) for r in stored} == {(v1, v2)}
    assert [r["prediction_id"] for r in stored] == [r["prediction_id"] for r in rows]
    assert all(r["challenger_ms"] > 0 and r["challenger_batch"] in (2, 4) for r in stored)


def test_a_full_queue_drops_counted_and_a_broken_candidate_never_raises(tmp_path):
    scorer, v1, _ = scorer_for(tmp_path, candidate_ok=False, queue_max=3)
    asyncio.run(scorer.follow())  # logged, retried later; nothing raised
    assert scorer.model is None and scorer._failure is not None
    scorer.offer(["text"] * 5, champion_rows(5, v1))  # no challenger: nothing queued, nothing dropped
    assert not scorer.queue and not scorer.dropped

    ok, v1, _ = scorer_for(tmp_path / "ok", queue_max=3)
    asyncio.run(ok.follow())
    ok.offer(["text"] * 5, champion_rows(5, v1))
    assert len(ok.queue) == 3 and ok.dropped == {"queue_full": 2}
    ok.configure({**ok.cfg, "enabled": False})
    assert ok.model is None and not ok.queue


def test_shadow_settings_are_checked():
    from intentops.api.settings import load_settings

    for bad, key in (
        ({"sample": 0}, "shadow.sample"),
        ({"queue_max": 0}, "shadow.queue_max"),
        ({"flush_s": 0}, "shadow.flush_s"),
        ({"enabled": "yes"}, "shadow.enabled"),
    ):
        with pytest.raises(UserError, match=key):
            load_settings(ROOT, {"shadow": bad})
    with pytest.raises(UserError, match="record_predictions"):
        load_settings(ROOT, {"shadow": {"enabled": True}, "store": {"record_predictions": False}})
