"""The commands the GitHub workflows run, run here too: the promotion-gate summary step of retrain.yml."""

import json

import pytest

from support import ROOT, run


@pytest.mark.parametrize(
    "gate, promoted",
    [
        ({"promoted": True, "reasons": ["macro-F1 diff +0.0040"]}, "true"),
        (
            {"promoted": False, "reasons": ["largest per-intent F1 drop 0.12 (card_arrival) > δ (0.05)"]},
            "false",
        ),
        (None, "false"),  # the promote stage did not run
    ],
)
def test_make_gate_status_writes_output_and_summary(tmp_path, gate, promoted):
    gate_file = tmp_path / "gate.json"
    if gate is not None:
        gate_file.write_text(json.dumps(gate))
    out, summary = tmp_path / "out", tmp_path / "summary.md"
    proc = run(
        ["make", "-s", "gate-status", f"GATE={gate_file}"],
        ROOT,
        {"GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert out.read_text() == f"promoted={promoted}\n"
    text = summary.read_text()
    assert (
        "## Promotion gate: promoted" if promoted == "true" else "## Promotion gate: not promoted"
    ) in text
    assert (json.dumps(gate["reasons"][0])[1:-1] if gate else "not found") in text
    assert "gate:" in proc.stdout
