"""The promote stage on tiny exported bundles: first model promoted, identical challenger kept, a worse one
rejected with reasons, a slow one rejected on latency, and rollback through the CLI.

The default test derives challengers from one exported bundle by editing it (fast); the slow one re-runs the
real export for each (and so also checks that exporting the same model twice gives the same version)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_export import exported_project, run_stage, set_params, tiny_project

from intentops.inference.registry import Registry


def gate(root, cfg) -> dict:
    return json.loads((root / cfg.paths.promote_gate).read_text())


def bundle_version(root, cfg) -> str:
    return json.loads((root / cfg.paths.bundle_dir / "bundle.json").read_text())["version"]


def shuffle_head(root, cfg, seed: int = 0) -> bytes:
    """Permute the trained head's class rows in place (a deliberately worse model); returns the original weights."""
    import torch

    path = root / cfg.paths.model_dir / "net.pt"
    original = path.read_bytes()
    state = torch.load(path, weights_only=True)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(state["layers.1.weight"].shape[0]))
    perm = torch.roll(perm, 1) if (perm == torch.arange(len(perm))).any() else perm  # no class keeps its row
    state["layers.1.weight"], state["layers.1.bias"] = (
        state["layers.1.weight"][perm],
        state["layers.1.bias"][perm],
    )
    torch.save(state, path)
    return original


@pytest.mark.slow
def test_promote_after_real_exports(tmp_path, capsys):
    from intentops.stages import export, promote

    root = tmp_path / "repo"
    cfg = tiny_project(root, ["export.quantize=false"])
    registry = Registry.at(root / cfg.paths.registry_dir)
    run_stage(export, root)
    v1 = bundle_version(root, cfg)

    # 1. No champion: the first model is promoted.
    run_stage(promote, root)
    g = gate(root, cfg)
    assert g["promoted"] and g["challenger"] == v1 and g["champion"] is None
    assert registry.production() == v1 and registry.versions() == [v1]
    assert (registry.root / v1 / "model.onnx").is_file() and len(registry.history()) == 1

    # 2. Re-exporting the same model gives the same version; the gate passes it and leaves the registry as it is.
    run_stage(export, root)
    assert bundle_version(root, cfg) == v1
    run_stage(promote, root)
    g = gate(root, cfg)
    assert g["promoted"] and g["champion"] == v1 and g["checks"]["macro_f1"]["diff"] == 0
    assert "already in production" in g["reasons"][-1] and len(registry.history()) == 1

    # 3. A head with shuffled class rows: rejected on macro-F1 and per-intent F1; production unchanged.
    original = shuffle_head(root, cfg)
    run_stage(export, root)
    bad = bundle_version(root, cfg)
    run_stage(promote, root)
    check_shuffled_head_rejected(gate(root, cfg), registry, bad, v1)

    # 4. The original model with other review thresholds: a new version with the same predictions, promoted.
    (root / cfg.paths.model_dir / "net.pt").write_bytes(original)
    set_params(root, ["export.quantize=false", "export.min_confidence=0.9"])
    run_stage(export, root)
    v2 = bundle_version(root, cfg)
    assert v2 not in (v1, bad)
    run_stage(promote, root)
    assert gate(root, cfg)["promoted"] and registry.production() == v2

    # 5. Over the latency budget: rejected, whatever the accuracy.
    set_params(
        root, ["export.quantize=false", "export.min_confidence=0.9", "promote.latency_budget_ms=0.001"]
    )
    run_stage(promote, root)
    g = gate(root, cfg)
    assert not g["promoted"] and not g["checks"]["latency"]["passed"] and g["checks"]["latency"]["p95_ms"] > 0

    # 6. Rollback through the CLI: to the previous production version, then forward again by name.
    check_rollback_cli(root, registry, v1, v2, bad, capsys)


def check_shuffled_head_rejected(g: dict, registry, bad: str, v1: str) -> None:
    """A challenger with shuffled class rows fails macro-F1 and per-intent F1; production stays on v1."""
    assert not g["promoted"] and g["challenger"] == bad and g["champion"] == v1
    assert not g["checks"]["macro_f1"]["passed"] and not g["checks"]["per_intent_f1"]["passed"]
    assert any("macro-F1" in r for r in g["reasons"]) and any("per-intent" in r for r in g["reasons"])
    assert registry.production() == v1 and bad not in registry.versions()


def check_rollback_cli(root, registry, v1: str, v2: str, bad: str, capsys) -> None:
    """Rollback through the CLI: to the previous production version, then forward again by name."""
    from intentops import cli

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli.main(["rollback"])
        assert registry.production() == v1
        cli.main(["rollback", "--to", v2])
        assert registry.production() == v2
        cli.main(["registry", "list"])
        with pytest.raises(SystemExit) as exc:
            cli.main(["rollback", "--to", bad])
        assert exc.value.code == 2
    out = capsys.readouterr()
    assert f"* {v2}" in out.out and f"  {v1}" in out.out and "is not in the registry" in out.err
    assert [e["event"] for e in registry.history()] == ["promote", "promote", "rollback", "rollback"]


def derive_bundle(bundle, dest, shuffle_head: bool = False, calibration: dict | None = None) -> str:
    """Copy an ONNX bundle, optionally with the head's class rows permuted or other calibration; re-seal it."""
    import onnx
    from onnx import numpy_helper

    from intentops.inference.bundle import seal

    shutil.copytree(bundle, dest)
    if shuffle_head:
        model = onnx.load(str(dest / "model.onnx"))
        (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm" and n.name.startswith("/head")]
        inits = {i.name: i for i in model.graph.initializer}
        k = numpy_helper.to_array(inits[gemm.input[2]]).shape[0]
        perm = np.roll(np.arange(k), 1)  # every class gets its neighbour's weights
        for name in gemm.input[1:3]:  # weight (k, in) as transB=1, bias (k,)
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name])[perm], name))
        onnx.save(model, str(dest / "model.onnx"))
        (dest / "model.int8.onnx").unlink(missing_ok=True)
    if calibration:
        cal = json.loads((dest / "calibration.json").read_text())
        (dest / "calibration.json").write_text(json.dumps({**cal, **calibration}))
    meta = json.loads((dest / "bundle.json").read_text())
    meta["variants"] = {k: v for k, v in meta["variants"].items() if (dest / v).is_file()}
    (dest / "bundle.json").write_text(json.dumps(meta))
    return seal(dest)  # new version in bundle.json and card.json, new manifest: the registry verifies it


def use_challenger(root, cfg, bundle) -> None:
    """Make `bundle` the export stage's output (the challenger promote reads)."""
    shutil.rmtree(root / cfg.paths.bundle_dir)
    shutil.copytree(bundle, root / cfg.paths.bundle_dir)


def test_promote_gate_registry_and_rollback(tmp_path_factory, tmp_path, capsys):
    from intentops.stages import promote

    root = tmp_path / "repo"
    cfg = exported_project(tmp_path_factory, root)
    registry = Registry.at(root / cfg.paths.registry_dir)
    exported = tmp_path / "exported"
    shutil.copytree(root / cfg.paths.bundle_dir, exported)
    v1 = bundle_version(root, cfg)

    run_stage(promote, root)  # no champion: promoted
    g = gate(root, cfg)
    assert g["promoted"] and g["challenger"] == v1 and g["champion"] is None and registry.production() == v1
    assert (registry.root / v1 / "model.onnx").is_file() and len(registry.history()) == 1

    run_stage(promote, root)  # the same bundle again: passes, registry unchanged
    g = gate(root, cfg)
    assert g["promoted"] and g["champion"] == v1 and g["checks"]["macro_f1"]["diff"] == 0
    assert "already in production" in g["reasons"][-1] and len(registry.history()) == 1

    bad = derive_bundle(exported, tmp_path / "bad", shuffle_head=True)
    use_challenger(root, cfg, tmp_path / "bad")
    run_stage(promote, root)
    check_shuffled_head_rejected(gate(root, cfg), registry, bad, v1)

    v2 = derive_bundle(exported, tmp_path / "v2", calibration={"min_confidence": 0.9})
    use_challenger(root, cfg, tmp_path / "v2")
    run_stage(promote, root)  # same predictions, new version: promoted
    assert (
        gate(root, cfg)["promoted"]
        and registry.production() == v2
        and registry.versions() == sorted([v1, v2])
    )

    set_params(root, ["promote.latency_budget_ms=0.001"])
    run_stage(promote, root)
    g = gate(root, cfg)
    assert (
        not g["promoted"]
        and not g["checks"]["latency"]["passed"]
        and any("over budget" in r for r in g["reasons"])
    )

    check_rollback_cli(root, registry, v1, v2, bad, capsys)
