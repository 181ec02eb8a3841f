"""`serve deploy serving/config.yaml` (what .github/workflows/deploy.yml runs) against a Ray head on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from integration.test_cluster import Cluster, ray_start
from integration.test_serving import write_tiny_bundle
from support import ROOT, free_port

pytestmark = pytest.mark.slow
SERVE = Path(sys.executable).parent / "serve"


def test_serve_deploy_of_the_committed_config(tmp_path):
    bundle = tmp_path / "bundle"
    version = write_tiny_bundle(bundle, confident=True)
    # The committed Serve config, pointed at a test bundle and free ports; no store or profiles needed here.
    cfg = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    http_port, dash_port = free_port(), free_port()
    cfg["http_options"]["port"] = http_port
    app = cfg["applications"][0]
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    user = app["deployments"][0]["user_config"]
    user.update(bundle=str(bundle), store={"record_predictions": False}, monitoring={"enabled": False})
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))

    temp_root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    cluster = Cluster(f"127.0.0.1:{free_port()}", temp_root)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    old = dict(os.environ)
    os.environ.update(RAY_AUTH_MODE=env["RAY_AUTH_MODE"], RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
    try:
        ray_start(
            [
                "--head",
                f"--port={cluster.address.split(':')[1]}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
            ],
            temp_root / "head",
        )
        address = f"http://127.0.0.1:{dash_port}"
        proc = subprocess.run(
            [str(SERVE), "deploy", str(config), "--address", address],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline, ready = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, "the deployed app never became ready"
        assert ready.json()["model_version"] == version
        r = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/predict", json={"text": "my card has not arrived"}, timeout=30
        )
        assert r.status_code == 200 and r.json()["model_version"] == version
        subprocess.run(
            [str(SERVE), "shutdown", "-y", "--address", address],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )
    finally:
        os.environ.clear()
        os.environ.update(old)
        cluster.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
