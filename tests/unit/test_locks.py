"""requirements-serve.lock (the serving image) agrees with requirements.lock and with pyproject's `serve` extra.

A package in both locks has one version, so an ONNX bundle exported by the pipeline unpickles and runs in the
image exactly as it did in the full environment (tfidf.joblib needs the same scikit-learn, the graph the same
onnxruntime). The serve lock is the dependency closure of the extra, and holds no training stack.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import ROOT

FULL_LOCK = ROOT / "requirements.lock"
SERVE_LOCK = ROOT / "requirements-serve.lock"
# What a bundle's predictions depend on: these must be in both locks, at one version.
BUNDLE_RUNTIME = {"scikit-learn", "numpy", "tokenizers", "onnxruntime"}
TRAINING_ONLY = {
    "torch",
    "pytorch-lightning",
    "lightning",
    "lightning-utilities",
    "torchmetrics",
    "great-expectations",
    "wandb",
    "dvc",
    "dvc-s3",
    "hydra-core",
    "hydra-optuna-sweeper",
    "hydra-ray-launcher",
    "transformers",
    "sentence-transformers",
    "onnx",
}
# Installed into the image's venv for `pip install --no-build-isolation .`; no runtime package requires it.
BUILD_ONLY = {"setuptools"}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)$")


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file; every line that is not a comment must be an exact pin."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path.name}:{n}: {line!r} is not an exact `name==version` pin; regenerate with make"
        name = canonicalize_name(m["name"])
        assert name not in pins, f"{path.name}:{n}: {name} is pinned twice"
        pins[name] = m["version"]
    return pins


def serve_extra() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["serve"]]


def closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of `requirements` and everything they require, read from the installed distributions.

    The test venv is installed from requirements.lock, whose versions the serve lock shares, so its metadata is
    the metadata of the packages in the image. Environment markers are evaluated for this interpreter (the image
    runs the same Python on the same platform).
    """
    names: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, from_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": from_extra}):
            continue
        name = canonicalize_name(req.name)
        names.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed in the test venv: run `make venv` (requirements.lock)")
        for extra in {"", *req.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            todo += [(Requirement(r), extra) for r in requires]
    return names


@pytest.fixture(scope="module")
def locks() -> tuple[dict[str, str], dict[str, str]]:
    return read_lock(FULL_LOCK), read_lock(SERVE_LOCK)


def test_shared_packages_have_one_version(locks):
    full, serve = locks
    assert BUNDLE_RUNTIME <= full.keys() & serve.keys(), (
        f"missing from a lock: {sorted(BUNDLE_RUNTIME - (full.keys() & serve.keys()))}"
    )
    differ = {n: (full[n], serve[n]) for n in full.keys() & serve.keys() if full[n] != serve[n]}
    assert differ == {}, (
        f"(requirements.lock, requirements-serve.lock) differ: {differ}; run `make lock-serve`"
    )


def test_serve_lock_is_a_subset_of_the_full_lock(locks):
    # The image runs nothing the pipeline's environment has not run: every serve pin is a full-lock pin.
    full, serve = locks
    assert sorted(serve.keys() - full.keys()) == []


def test_serve_lock_has_no_training_stack(locks):
    _, serve = locks
    training = sorted(n for n in serve if n in TRAINING_ONLY or n.startswith(("nvidia-", "triton")))
    assert training == [], f"requirements-serve.lock holds training-only packages: {training}"


def test_serve_extra_is_pinned_within_its_ranges(locks):
    _, serve = locks
    extra = serve_extra()
    assert extra, "pyproject.toml has no `serve` extra"
    unpinned = sorted(canonicalize_name(r.name) for r in extra if canonicalize_name(r.name) not in serve)
    assert unpinned == [], f"in the serve extra but not in requirements-serve.lock: {unpinned}"
    outside = {
        r.name: serve[canonicalize_name(r.name)]
        for r in extra
        if not r.specifier.contains(serve[canonicalize_name(r.name)], prereleases=True)
    }
    assert outside == {}, f"pins outside the extra's ranges: {outside}; run `make lock-serve`"


def test_serve_lock_is_exactly_the_extras_closure(locks):
    # Nothing the replica needs is missing (it would fail on import in the image) and nothing else rides along.
    _, serve = locks
    needed = closure(serve_extra())
    assert sorted(needed - serve.keys()) == [], (
        "required by the serve extra but not in requirements-serve.lock"
    )
    assert sorted(serve.keys() - needed - BUILD_ONLY) == [], (
        "in requirements-serve.lock but required by nothing"
    )
