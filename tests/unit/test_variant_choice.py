"""Which graph a replica serves for `serving.variant` (intentops.api.model.served_variant), from bundle.json's
"variant_checks" that `export` writes: an int8 graph over export.max_int8_drop, or never checked, is not served."""

from __future__ import annotations

import pytest

from intentops.api.model import served_variant


def checks(drop_pt: float, max_drop_pt: float = 0.5) -> dict:
    return {
        "variant_checks": {
            "int8": {
                "accuracy": 0.94 - drop_pt / 100,
                "fp32_accuracy": 0.94,
                "drop_pt": drop_pt,
                "max_drop_pt": max_drop_pt,
                "fit": drop_pt <= max_drop_pt,
            }
        }
    }


@pytest.mark.parametrize(
    ("meta", "requested", "force", "served", "reason"),
    [
        (checks(0.3), "int8", False, "int8", None),
        (
            checks(2.7),
            "int8",
            False,
            "fp32",
            "loses 2.7 pt of test accuracy against fp32, over export.max_int8_drop (0.5 pt)",
        ),
        (checks(2.7, max_drop_pt=3.0), "int8", False, "int8", None),
        ({}, "int8", False, "fp32", "records no accuracy check of its int8 graph"),
        (checks(2.7), "int8", True, "int8", None),
        ({}, "int8", True, "int8", None),
        (checks(2.7), "fp32", False, "fp32", None),
    ],
)
def test_the_served_graph_and_why(meta, requested, force, served, reason):
    got = served_variant(meta, requested, force)
    assert (got["requested"], got["served"]) == (requested, served)
    if reason is None:
        assert got["reason"] is None
    else:
        assert got["reason"].startswith("serving fp32: ") and reason in got["reason"]
