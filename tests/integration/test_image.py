"""The serving image (`make image`, deploy/Containerfile) serves a model from an S3 registry, without torch.

Builds the image (and, where no container registry is reachable, its debootstrapped base: deploy/base-image.sh),
puts a tiny ONNX bundle into a registry on moto's S3 server at s3://<bucket>/registry with the project's CLI
(`intentops registry stage` + `promote`), then runs the image as a Ray node on the host network, the way KubeRay
does (`ray start`, then the Serve config), and asks it for /readyz and a prediction. Every Ray port and the Serve
port are free ones, so nothing clashes with another Ray on this machine. Needs root (podman, apt).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from support import ROOT, S3_ENV, free_port, moto_s3, write_tiny_onnx_bundle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

IMAGE = "intentops-serve:test"
PODMAN = ["podman", "--runtime", "runc"]  # crun cannot set up cgroups on these machines
BIN = Path(sys.executable).parent
LABELS = ["lost_or_stolen_card", "card_arrival", "exchange_rate"]
TRAINING_ONLY = [
    "torch",
    "pytorch_lightning",
    "lightning",
    "torchmetrics",
    "great_expectations",
    "wandb",
    "dvc",
]
BUILD_TIMEOUT_S = 1800
READY_TIMEOUT_S = 300


def sh(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; fail the test with its output's tail if it exits non-zero."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The serving image, built by `make image` (the base image too when it is missing)."""
    if os.geteuid() != 0:
        pytest.skip("the image test needs root: podman, runc and debootstrap are installed and run as root")
    if shutil.which("podman") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("podman is not installed and there is no apt-get to install it")
        proc = subprocess.run(
            [str(ROOT / "deploy/base-image.sh")], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if shutil.which("podman") is None:
            pytest.skip(f"podman could not be installed with apt: {proc.stderr[-1500:]}")
        assert proc.returncode == 0, f"deploy/base-image.sh failed:\n{proc.stderr[-3000:]}"
    sh(["make", "image", f"IMAGE={IMAGE}"], BUILD_TIMEOUT_S, cwd=ROOT)
    yield IMAGE
    # Only the tag: the layers stay in podman's cache (shared with `make image`'s), so the next build is quick.
    subprocess.run([*PODMAN, "rmi", IMAGE], capture_output=True, timeout=120)


def in_image(image: str, script: str) -> str:
    """stdout of `python -c script` in a throwaway container of the image."""
    return sh([*PODMAN, "run", "--rm", "--network=host", image, "python", "-c", script], 120).stdout


def test_image_holds_the_serving_path_and_no_training_stack(image):
    script = (
        "import json, os, sys, importlib.util as u; import serving.app; "
        "from intentops.inference.predictor import Predictor; "
        "print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'app': sorted(os.listdir('/app')), "
        f"'installed': [m for m in {TRAINING_ONLY!r} if u.find_spec(m)], "
        "'imported': sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'hydra', 'dvc', 'wandb'})}))"
    )
    got = json.loads(in_image(image, script).strip().splitlines()[-1])
    # uid 1000 in /app, nothing of the training stack installed or imported, and no models or data baked in.
    assert got == {
        "uid": 1000,
        "cwd": "/app",
        "app": ["params.yaml", "serving"],
        "installed": [],
        "imported": [],
    }


@pytest.fixture
def s3_registry(tmp_path):
    """(environment for the CLI and the container, production version): a tiny bundle promoted in an S3 registry."""
    with moto_s3(bucket="image-test") as url:
        env = {**S3_ENV, "AWS_ENDPOINT_URL": url, "INTENTOPS_REGISTRY_URL": "s3://image-test/registry"}
        version = write_tiny_onnx_bundle(tmp_path / "bundle", LABELS, confident=True)
        cli = {**os.environ, **env}
        sh([str(BIN / "intentops"), "registry", "stage", str(tmp_path / "bundle")], 120, cwd=ROOT, env=cli)
        sh([str(BIN / "intentops"), "registry", "promote", version], 120, cwd=ROOT, env=cli)
        yield env, version


def serve_config(dest: Path, port: int) -> Path:
    """serving/config.yaml with the Serve proxy on 127.0.0.1:`port`, in a folder the container's user can read."""
    config = yaml.safe_load((ROOT / "serving/config.yaml").read_text(encoding="utf-8"))
    config["http_options"].update(host="127.0.0.1", port=port)
    dest.mkdir(mode=0o755)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (dest / "config.yaml").chmod(0o644)
    return dest


def node_command(gcs_port: int) -> str:
    """What the container runs: the schema, a Ray head on free ports (as KubeRay's `ray start`), the Serve config."""
    ray_ports = (
        f"--port={gcs_port} --ray-client-server-port={free_port()} "
        f"--dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()}"
    )
    return (
        "set -e; intentops db upgrade; "
        f"ray start --head --node-ip-address=127.0.0.1 {ray_ports} --include-dashboard=false --num-cpus=2 "
        "--object-store-memory=100000000 --disable-usage-stats --log-style=record; "
        f"exec serve run --address=127.0.0.1:{gcs_port} /config/config.yaml"
    )


def logs(name: str) -> str:
    proc = subprocess.run([*PODMAN, "logs", "--tail", "80", name], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr)[-6000:]


def running(name: str) -> bool:
    proc = subprocess.run(
        [*PODMAN, "inspect", "--format", "{{.State.Running}}", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() == "true"


def test_image_serves_the_production_model_from_s3(image, s3_registry, tmp_path):
    env, version = s3_registry
    port, name = free_port(), f"intentops-image-test-{secrets.token_hex(4)}"
    config_dir = serve_config(tmp_path / "config", port)
    env = {**env, "INTENTOPS_DB_URL": "sqlite:////tmp/intentops-queue.db"}
    run = [*PODMAN, "run", "-d", "--name", name, "--network=host", "--shm-size=512m"]
    run += ["-v", f"{config_dir}:/config:ro", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")]]
    sh([*run, image, "bash", "-c", node_command(free_port())], 120)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline, ready = time.monotonic() + READY_TIMEOUT_S, None
        with httpx.Client(base_url=url, timeout=10) as client:
            while time.monotonic() < deadline:
                assert running(name), f"the container stopped:\n{logs(name)}"
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(2)
            assert ready is not None and ready.status_code == 200, (
                f"not ready after {READY_TIMEOUT_S} s:\n{logs(name)}"
            )
            assert ready.json()["model_version"] == version

            r = client.post("/v1/predict", json={"texts": ["I lost my card", "where is my new card"]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"] == version
            # The confident tiny bundle sends every text to its first label.
            assert [p["intent"] for p in body["predictions"]] == [LABELS[0]] * 2
            assert all(p["confidence"] > 0.9 for p in body["predictions"])
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)
