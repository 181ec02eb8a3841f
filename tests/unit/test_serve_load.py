"""The figures of benchmarks/serve_load.py from what a run leaves: the replica's request log, py-spy's stacks, runs."""

from __future__ import annotations

import json

from serve_load import formed_batch, median_of, summarise_run, top_frames


def test_the_formed_batch_is_texts_per_model_call_within_the_phase(tmp_path):
    """Calls of 4, 4, 2 single-text requests (10 lines, 3 calls) in the window; lines outside it are ignored."""
    lines = [
        {"timestamp": 100.0 + i, "batch_size": b, "model_cpu_ms": 4.0 * b}
        for i, b in enumerate([4] * 8 + [2] * 2)
    ]
    lines += [{"timestamp": 50.0, "batch_size": 32}, {"timestamp": 100.5, "path": "/readyz"}]
    log = tmp_path / "replica_intentops_IntentService_abc.requests.log"
    log.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    formed, model_cpu = formed_batch(tmp_path, (100.0, 109.0))
    assert abs(formed - 10 / 3) < 1e-9 and model_cpu == 4.0  # 4 ms of CPU per text, whatever the call size


def test_top_frames_counts_self_and_inclusive_samples(tmp_path):
    stacks = tmp_path / "replica_c32.txt"
    stacks.write_text("main;handle;parse 3\nmain;handle;model 6\nmain;idle 1\n")
    got = top_frames(stacks)
    assert got["samples"] == 10
    assert got["self"][0] == {"frame": "model", "pct": 60.0}
    assert {"frame": "handle", "pct": 90.0} in got["inclusive"]


def test_median_of_runs_takes_each_figure_nested_or_not():
    runs = [
        {"a": 1.0, "cpu": {"replica": 9.0}, "name": "x"},
        {"a": 5.0, "cpu": {"replica": 7.0}, "name": "y"},
        {"a": 2.0, "cpu": {"replica": 8.0}, "name": "z"},
    ]
    assert median_of(runs) == {"a": 2.0, "cpu": {"replica": 8.0}, "name": "x"}


def test_replica_overhead_is_live_minus_echo_minus_model_cpu():
    """At c32: replica CPU/request 10 (live) - 3 (echo) - model CPU per text at the formed batch (52 ms / 13)."""

    def phase(rps, replica_ms, p50=10.0):
        return {
            "rps": rps,
            "p50_ms": p50,
            "p95_ms": p50,
            "p99_ms": p50,
            "errors": 0,
            "texts_per_s": rps,
            "cpu_ms_per_req": {"replica": replica_ms},
        }

    raws = {
        1: {"sents_per_s": 250.0, "single_ms": 6.0, "cpu_ms_per_batch": 128.0},
        2: {"sents_per_s": 400.0, "single_ms": 5.0, "cpu_ms_per_batch": 160.0},
    }
    live = {1: phase(40, 20.0, p50=20.0), 8: phase(80, 12.0), 32: phase(90, 10.0)}
    batch = phase(7, 150.0) | {"texts_per_s": 225.0}
    model = {"cpu_ms_per_batch": 52.0}
    out = summarise_run(raws, 1, phase(70, 4.0, p50=12.0), phase(200, 3.0), live, batch, 12.7, model, 4.5)
    assert out["replica_overhead_ms"] == 3.0 and out["model_cpu_ms_per_req_c32"] == 4.0
    assert out["replica_overhead_in_replica_ms"] == 2.5
    assert (
        out["c1_over_ms"] == 20.0 - 12.0 - 6.0
    )  # c1 p50 - echo c1 p50 - raw single at the replica's threads
    assert out["list32_vs_raw"] == 0.9 and out["list32_vs_raw_best"] == round(225 / 400, 3)
    assert out["ratio_c32_vs_ceiling"] == round(90 / (1 / (1 / 200 + 1 / 400)), 3)


def test_shadow_summary_compares_median_replica_cpu_with_shadow_on_and_off():
    from serve_load import shadow_summary

    def phase(replica_ms, rps=100.0):
        return {"cpu_ms_per_req": {"replica": replica_ms}, "rps": rps, "p50_ms": 10.0, "errors": 0}

    off = [phase(10.0), phase(12.0), phase(11.0)]
    on = [phase(11.5), phase(11.0), phase(13.0)]
    out = shadow_summary(off, on)
    assert out["off"]["replica_cpu_ms_per_req"] == 11.0 and out["off"]["spread"] == [10.0, 12.0]
    assert out["on"]["replica_cpu_ms_per_req"] == 11.5 and out["on"]["runs"] == [11.5, 11.0, 13.0]
    assert out["added_pct"] == round(100 * (11.5 - 11.0) / 11.0, 2)
