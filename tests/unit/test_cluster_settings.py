"""Cluster mode and auth: a replica refuses per-node state and a missing API key before it serves anything,
with an error that names the setting; the deployment's environment overrides the registry and profiles URLs."""

from __future__ import annotations

import pytest

from intentops.api.settings import (
    PROFILES_ENV,
    check_deployment,
    load_settings,
    merge_settings,
    registry_of,
    with_environment,
)
from intentops.config import API_KEY_ENV
from intentops.errors import UserError
from intentops.feedback.store import DB_URL_ENV
from intentops.inference.registry import REGISTRY_ENV
from support import ROOT

SHARED = {
    DB_URL_ENV: "postgresql+psycopg://intentops@db/intentops",
    PROFILES_ENV: "s3://bucket/profiles",
    REGISTRY_ENV: "s3://bucket/registry",
    API_KEY_ENV: "k1",
}


@pytest.fixture
def defaults(monkeypatch):
    for key in SHARED:
        monkeypatch.delenv(key, raising=False)
    settings, _ = load_settings(ROOT, None)
    return settings


def cluster(defaults, monkeypatch, env: dict, **user_config) -> dict:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return with_environment(merge_settings(defaults, {"cluster": True, "auth": "required", **user_config}))


def test_cluster_mode_accepts_shared_state_from_the_environment(defaults, monkeypatch):
    settings = cluster(defaults, monkeypatch, SHARED)
    check_deployment(settings)
    assert settings["registry"] == "s3://bucket/registry"
    assert settings["monitoring"]["profiles"] == "s3://bucket/profiles"
    assert registry_of(settings, ROOT).url == "s3://bucket/registry"


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        (DB_URL_ENV, "INTENTOPS_DB_URL"),
        (PROFILES_ENV, "INTENTOPS_PROFILES_URL"),
        (REGISTRY_ENV, "INTENTOPS_REGISTRY_URL"),
        (API_KEY_ENV, "INTENTOPS_API_KEY"),
    ],
)
def test_cluster_mode_refuses_per_node_state_naming_it(defaults, monkeypatch, missing, named):
    settings = cluster(defaults, monkeypatch, {k: v for k, v in SHARED.items() if k != missing})
    with pytest.raises(UserError) as err:
        check_deployment(settings)
    assert named in err.value.render()


def test_sqlite_is_per_node_even_when_named(defaults, monkeypatch):
    settings = cluster(defaults, monkeypatch, {**SHARED, DB_URL_ENV: "sqlite:////tmp/queue.db"})
    with pytest.raises(UserError, match="review queue"):
        check_deployment(settings)


def test_what_cluster_mode_does_not_need_is_not_asked_for(defaults, monkeypatch):
    env = {REGISTRY_ENV: SHARED[REGISTRY_ENV]}
    settings = cluster(
        defaults,
        monkeypatch,
        env,
        auth="off",
        store={"record_predictions": False},
        monitoring={"enabled": False},
    )
    check_deployment(settings)


def test_auth_settings(defaults, monkeypatch):
    check_deployment(merge_settings(defaults, {"auth": "optional"}))  # a laptop: no key needed
    with pytest.raises(UserError, match="serving.auth: off"):
        check_deployment(merge_settings(defaults, {"auth": "required"}))
    with pytest.raises(UserError, match="one of"):
        check_deployment(merge_settings(defaults, {"auth": "maybe"}))
    monkeypatch.setenv(API_KEY_ENV, "k1")
    check_deployment(merge_settings(defaults, {"auth": "required"}))


def test_the_middleware_policy_follows_auth(monkeypatch):
    from intentops.api.middleware import Policy

    monkeypatch.setenv(API_KEY_ENV, "k1,k2")
    policy = Policy()
    policy.configure(1000, "optional")
    assert policy.api_keys == "k1,k2" and policy.max_bytes == 1000
    policy.configure(1000, "off")
    assert policy.api_keys is None
