"""dvc.lock across machines (intentops.lockfile) and the writers that keep run facts out of DVC outputs (io)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import yaml

from intentops.errors import UserError
from intentops.io import read_json, write_metrics, write_npz
from intentops.lockfile import adopt, compare, git_outputs
from support import ROOT


def test_git_outputs_are_the_cache_false_outputs_of_this_pipeline():
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    carried = git_outputs(ROOT)
    # Metrics and reports DVC does not push: git carries them; cached data and models are not in the list.
    for key in (
        "train_metrics",
        "eval_metrics",
        "baseline_metrics",
        "split_stats",
        "promote_gate",
        "eval_plots_dir",
    ):
        assert paths[key] in carried, key
    for key in ("raw_dir", "train", "embeddings_dir", "model_dir", "bundle_dir", "validation_result"):
        assert paths[key] not in carried, key
    assert all("${" not in p for p in carried)


def _checkout(root, lock: dict, files: dict[str, str]):
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_adopt_copies_the_lock_and_what_git_carries_and_refuses_another_pipeline(tmp_path):
    lock = {"train": {"outs": [{"path": "models/train", "md5": "a.dir"}]}}
    run = _checkout(
        tmp_path / "run",
        lock,
        {
            "reports/train/metrics.json": '{"val": 1}',
            "reports/eval/plots/x.json": "[]",
            "models/train/w": "w",
        },
    )
    dest = _checkout(tmp_path / "dest", {}, {"reports/train/metrics.json": '{"val": 0}'})
    copied = adopt(run, dest)
    assert (
        copied[0] == "dvc.lock" and "reports/train/metrics.json" in copied and "reports/eval/plots" in copied
    )
    assert read_json(dest / "reports/train/metrics.json") == {"val": 1}
    assert yaml.safe_load((dest / "dvc.lock").read_text())["stages"] == lock
    assert not (dest / "models/train").exists(), "cached outputs travel through the remote, not adopt"

    (run / "params.yaml").write_text((run / "params.yaml").read_text() + "\nextra: 1\n")
    with pytest.raises(UserError, match="params.yaml differs"):
        adopt(run, dest)


def test_compare_marks_each_output(tmp_path):
    a = _checkout(tmp_path / "a", {"s": {"outs": [{"path": "x", "md5": "1"}, {"path": "y", "md5": "2"}]}}, {})
    b = _checkout(tmp_path / "b", {"s": {"outs": [{"path": "x", "md5": "1"}, {"path": "y", "md5": "3"}]}}, {})
    lines, verdict = compare([a, b])
    assert verdict == {"same": ["x"], "different": ["y"]}
    assert lines[1].startswith("same") and lines[2].startswith("DIFF")


def test_write_npz_gives_the_same_bytes_for_the_same_arrays(tmp_path):
    arrays = {"b": np.ones((2, 3), np.float32), "a": np.arange(4)}
    write_npz(tmp_path / "one.npz", arrays)
    time.sleep(2.1)  # zip entry times have 2-second resolution: np.savez's would now differ
    write_npz(tmp_path / "two.npz", dict(reversed(arrays.items())))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    loaded = np.load(tmp_path / "one.npz")
    assert sorted(loaded.files) == ["a", "b"] and np.array_equal(loaded["b"], arrays["b"])


def test_write_metrics_keeps_run_facts_out_of_the_output(tmp_path):
    metrics = {"val": {"accuracy": 0.9}, "seconds": 12.5, "wandb": {"run_id": "x"}}
    write_metrics(
        tmp_path / "reports/train/metrics.json", metrics, tmp_path / "runs", ("seconds", "wandb", "gone")
    )
    assert read_json(tmp_path / "reports/train/metrics.json") == {"val": {"accuracy": 0.9}}
    assert read_json(tmp_path / "runs/train.json") == {"seconds": 12.5, "wandb": {"run_id": "x"}}
