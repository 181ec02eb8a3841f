"""The Serve configs and the KubeRay manifest: one source, rendered and committed alike, valid, and hardened.

serving/config.yaml + serving/cluster.overlay.yaml are the source; serving/cluster.yaml and the serveConfigV2 of
deploy/rayservice.yaml are rendered from them by `intentops.deploy`. Each config goes through Ray Serve's own
schema (`ServeDeploySchema`), and the manifest's pod specs are walked field by field.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from intentops.deploy import (
    CLUSTER_CONFIG,
    CLUSTER_OVERLAY,
    RAYSERVICE,
    SERVE_CONFIG,
    main,
    overlay,
    render,
    splice_serve_config,
    stale,
)
from intentops.errors import UserError
from support import ROOT

IMAGE = re.compile(r"^ghcr\.io/[a-z0-9][a-z0-9-]*/intentops-serve:[\w][\w.-]{0,127}$")
# Pod env that must come from a Secret, never a literal in the manifest.
SECRET_ENV = {
    "RAY_AUTH_TOKEN",
    "INTENTOPS_API_KEY",
    "INTENTOPS_DB_URL",
    "INTENTOPS_REGISTRY_URL",
    "INTENTOPS_PROFILES_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
}
SERVE_PORT = 8000


def _yaml(path: Path) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def _manifest() -> dict:
    return _yaml(RAYSERVICE)


def _serve_config_v2() -> dict:
    return yaml.safe_load(_manifest()["spec"]["serveConfigV2"])


def _deployment(config: dict) -> dict:
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    return deployment


def _pod_specs() -> list[tuple[str, dict]]:
    cluster = _manifest()["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (f"worker group {group['groupName']}", group["template"]["spec"])
        for group in cluster["workerGroupSpecs"]
    ]


def _ray_container(spec: dict) -> dict:
    # KubeRay treats the first container as the Ray container.
    return spec["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


# --- one source -----------------------------------------------------------------------------------------------


def test_the_committed_files_are_what_the_source_renders():
    diffs = stale(ROOT, render(ROOT))
    assert not diffs, "stale, run `intentops deploy-config` (python -m intentops.deploy):\n" + "\n".join(
        diffs.values()
    )


def test_serve_config_v2_is_the_cluster_config():
    assert _serve_config_v2() == _yaml(CLUSTER_CONFIG)


def test_check_fails_on_a_stale_file_and_write_mode_fixes_it(tmp_path, capsys):
    for path in (SERVE_CONFIG, CLUSTER_OVERLAY, CLUSTER_CONFIG, RAYSERVICE):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    assert main(["--check", "--root", str(tmp_path)]) == 0

    base = tmp_path / SERVE_CONFIG
    base.write_text(base.read_text().replace("request_timeout_s: 10", "request_timeout_s: 11"))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{CLUSTER_CONFIG} is out of date" in err and f"{RAYSERVICE} is out of date" in err
    assert "+  request_timeout_s: 11" in err and "intentops deploy-config" in err

    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0
    manifest = (tmp_path / RAYSERVICE).read_text()
    assert "request_timeout_s: 11" in manifest and "# Hand-written, except the body" in manifest


def test_overlay_merges_by_key_and_by_name_and_null_deletes():
    base = {
        "a": 1,
        "keep": {"x": 1, "y": 2},
        "apps": [{"name": "one", "n": 1, "drop": True}, {"name": "two", "n": 2}],
    }
    delta = {"a": 2, "keep": {"y": 3, "z": 4}, "apps": [{"name": "one", "n": 10, "drop": None}], "new": [1]}
    assert overlay(base, delta) == {
        "a": 2,
        "keep": {"x": 1, "y": 3, "z": 4},
        "apps": [{"name": "one", "n": 10}, {"name": "two", "n": 2}],
        "new": [1],
    }
    with pytest.raises(UserError, match="three"):
        overlay(base, {"apps": [{"name": "three"}]})


def test_splice_replaces_only_the_block_body():
    manifest = "# top\nspec:\n  # why\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n\n  next: keep\n"
    assert splice_serve_config(manifest, "new: 3\nlist:\n- a\n") == (
        "# top\nspec:\n  # why\n  serveConfigV2: |\n    new: 3\n    list:\n    - a\n\n  next: keep\n"
    )
    with pytest.raises(UserError, match="serveConfigV2"):
        splice_serve_config("spec: {}\n", "a: 1\n")


# --- the Serve configs ----------------------------------------------------------------------------------------

SERVE_CONFIGS = {
    "loopback": lambda: _yaml(SERVE_CONFIG),
    "cluster": lambda: _yaml(CLUSTER_CONFIG),
    "serveConfigV2": _serve_config_v2,
}


@pytest.mark.parametrize("which", list(SERVE_CONFIGS))
def test_serve_accepts_the_config(which):
    # Imported here, not at collection: importing Ray fixes its token-auth mode for the whole pytest process, and
    # the slow cluster tests (tests/integration/test_cluster.py) set RAY_AUTH_MODE=token before their ray.init.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(SERVE_CONFIGS[which]())


@pytest.mark.parametrize("which", list(SERVE_CONFIGS))
def test_user_config_keys_are_serving_settings(which):
    # A misspelt key would make every replica refuse to start; conf/serving/default.yaml lists them all.
    known = yaml.safe_load((ROOT / "conf" / "serving" / "default.yaml").read_text())

    def unknown(values: dict, schema: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in values.items():
            if key not in schema:
                found.append(prefix + key)
            elif isinstance(value, dict) and isinstance(schema[key], dict):
                found += unknown(value, schema[key], f"{prefix}{key}.")
        return found

    assert not unknown(_deployment(SERVE_CONFIGS[which]())["user_config"], known)


def test_the_loopback_config_stays_on_one_small_host():
    config = _yaml(SERVE_CONFIG)
    assert config["http_options"]["host"] == "127.0.0.1"
    assert _deployment(config)["autoscaling_config"]["max_replicas"] == 1


def test_the_cluster_config_is_for_a_cluster():
    config = _yaml(CLUSTER_CONFIG)
    deployment = _deployment(config)
    user, scaling = deployment["user_config"], deployment["autoscaling_config"]
    assert config["http_options"]["host"] == "0.0.0.0"
    assert user["cluster"] is True
    assert user["auth"] == "required"
    assert scaling["min_replicas"] >= 2
    assert scaling["max_replicas"] > scaling["min_replicas"]
    assert scaling["min_replicas"] <= scaling.get("initial_replicas", scaling["min_replicas"])
    # The autoscaler adds a replica only when the target is below what one replica takes.
    assert scaling["target_ongoing_requests"] < deployment["max_ongoing_requests"]
    assert config["applications"][0]["runtime_env"]["working_dir"] == "local:///app"
    # State, registry and credentials come from each node's environment (Secrets), never from this file.
    assert "registry" not in user and "db" not in user.get("store", {})
    assert not SECRET_ENV & set(
        deployment.get("ray_actor_options", {}).get("runtime_env", {}).get("env_vars", {})
    )
    assert not SECRET_ENV & set(config["applications"][0]["runtime_env"].get("env_vars", {}))


# --- the KubeRay manifest -------------------------------------------------------------------------------------


def test_the_manifest_pins_the_ray_version_of_the_lock():
    from importlib.metadata import version

    assert _manifest()["spec"]["rayClusterConfig"]["rayVersion"] == version("ray")


@pytest.mark.parametrize("node", ["head", "worker group cpu"])
def test_every_ray_pod_runs_the_serving_image_hardened(node):
    spec = dict(_pod_specs())[node]
    container = _ray_container(spec)
    assert IMAGE.match(container["image"]), (
        f"{node}: {container['image']} is not ghcr.io/<owner>/intentops-serve"
    )
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["readOnlyRootFilesystem"] is True
    # Ray writes /tmp/ray and the object store /dev/shm: both must be emptyDir volumes on a read-only root.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for path in ("/tmp", "/dev/shm"):
        assert path in mounts, f"{node}: nothing writable mounted at {path}"
        assert "emptyDir" in volumes[mounts[path]], f"{node}: {path} is not an emptyDir"


@pytest.mark.parametrize("node", ["head", "worker group cpu"])
def test_every_ray_pod_gets_its_settings_from_secrets(node):
    env = _env(_ray_container(dict(_pod_specs())[node]))
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    for name in SECRET_ENV:
        assert name in env, f"{node}: {name} is not set"
        assert "value" not in env[name], f"{node}: {name} is a literal; take it from a Secret"
        assert env[name]["valueFrom"]["secretKeyRef"]["name"], f"{node}: {name} names no Secret"
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True


def test_ray_token_auth_covers_the_dashboard_the_operator_calls():
    cluster = _manifest()["spec"]["rayClusterConfig"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token"
    for node, spec in _pod_specs():
        token = _env(_ray_container(spec))["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        # The operator authenticates its own dashboard calls with the authOptions Secret: the same one.
        assert (token["name"], token["key"]) == (auth["secretName"], "auth_token"), node
    # The dashboard listens on the pod network only because the operator calls it there; never exposed.
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def test_workers_probe_the_api_and_the_head_keeps_kuberays_probes():
    for node, spec in _pod_specs():
        container = _ray_container(spec)
        if node == "head":
            # Head readiness gates serveConfigV2's submission: a /readyz probe there would never pass.
            assert "readinessProbe" not in container and "livenessProbe" not in container
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == SERVE_PORT, f"{node}: KubeRay's Serve Service targets the port named serve"
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            action = container[probe]["httpGet"]
            assert (action["path"], action["port"]) == (path, SERVE_PORT), f"{node}: {probe}"


def test_the_autoscaler_sidecar_is_hardened_too():
    options = _manifest()["spec"]["rayClusterConfig"]["autoscalerOptions"]
    ctx = options["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in options["volumeMounts"]
