"""A small trained model for behavioural tests: the fixture dataset of tests/support.py, the real config shrunk."""

from __future__ import annotations

import pytest

# TEMPLATES and write_fixture_project are re-exported for the integration tests that import them from here.
from support import INTENT_TEMPLATES as TEMPLATES  # noqa: F401
from support import SMALL, write_fixture_project


@pytest.fixture(scope="session")
def small_overrides() -> list[str]:
    """Overrides that shrink the real config for tests."""
    return list(SMALL)


@pytest.fixture(scope="session")
def small_project(tmp_path_factory):
    """(root, cfg) of a project holding the fixture data and embeddings."""
    from intentops.config import compose

    root = tmp_path_factory.mktemp("project")
    cfg = compose(SMALL)
    write_fixture_project(root, cfg)
    return root, cfg


@pytest.fixture(scope="session")
def trained(small_project, tmp_path_factory):
    """(Predictor, metrics) of the default model trained on the fixture data with the real config, shrunk."""
    from intentops.config import compose
    from intentops.inference.predictor import Predictor
    from intentops.training import train_from_config

    root, _ = small_project
    cfg = compose(SMALL + ["model.max_epochs=30", "model.batch_size=32", "train.patience=30"])
    bundle = tmp_path_factory.mktemp("bundle") / "model"
    metrics = train_from_config(cfg, bundle, tmp_path_factory.mktemp("work"), root=root)
    return Predictor.load(bundle), metrics
