"""Test support: the one fixture dataset (a small Banking77-shaped one the tests write themselves), the one set of
overrides that shrinks the real config for it, and a real DVC repo to run the pipeline in."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from intentops.scratch import create_project, tool_env

ROOT = Path(__file__).resolve().parents[1]

# Six real Banking77 intents with paraphrase templates. A slot ({x} a filler word, {amount} a sum of money)
# varies the wording so train, val and test differ and a tiny model can still learn every intent.
INTENT_TEMPLATES: dict[str, list[str]] = {
    "card_arrival": [
        "when will my card {x} arrive",
        "my new card {x} has not arrived yet",
        "how long does the card {x} take to be delivered",
        "still waiting for my card {x} in the post",
        "where is my card {x}, it should have come by now",
        "card {x} delivery is taking ages",
    ],
    "lost_or_stolen_card": [
        "i lost my card {x}",
        "my card {x} was stolen",
        "someone stole my card {x} yesterday",
        "i cannot find my card {x} anywhere",
        "please block my card {x}, it is lost",
        "my wallet with the card {x} got stolen",
    ],
    "exchange_rate": [
        "what exchange rate do you use {x}",
        "how much is the euro to dollar rate {x}",
        "what is the current exchange rate {x}",
        "which rate do you apply for currency exchange {x}",
        "is the exchange rate good today {x}",
        "tell me the conversion rate {x}",
    ],
    "top_up_failed": [
        "my top up failed {x}",
        "the top-up did not go through {x}",
        "i could not top up my account {x}",
        "top up was declined {x}",
        "why did my top up fail {x}",
        "adding money to my account failed {x}",
        "i tried to top up {amount} but it failed",
    ],
    "pin_blocked": [
        "my pin is blocked {x}",
        "i entered the wrong pin too many times {x}",
        "how do i unblock my pin {x}",
        "my pin got locked {x}",
        "the cash machine says my pin is blocked {x}",
        "i need my pin unblocked {x}",
    ],
    "balance_not_updated_after_bank_transfer": [
        "my balance has not updated after the bank transfer {x}",
        "transfer arrived but balance is the same {x}",
        "i sent money by bank transfer and my balance did not change {x}",
        "the bank transfer is not showing in my balance {x}",
        "why is my balance not updated after transfer {x}",
        "my account balance still shows the old amount after the transfer {x}",
    ],
}
FILLERS = {
    "x": ["", "please", "today", "again", "thanks", "now", "urgently", "help", "please help", "asap"],
    "amount": ["£20", "$50", "100 euros", "£5"],
}

# The real config shrunk for the fixture: no W&B, no progress bar, few timing calls, 2 threads (CI has 2 cores),
# and validation and split sized for six small classes. Tests add what they change (epochs, ...) after it.
SMALL = [
    "logger=none",
    "trainer.enable_progress_bar=false",
    "train.inference_sample=16",
    "train.num_threads=2",
    "validate.min_examples_per_class=5",
    "split.val_fraction=0.2",
    # The fixture's val is small, so the default would cross-fit (20 extra fits) in every test that trains;
    # tests/integration/test_small_data.py and tests/unit/test_crossfit.py run it.
    "train.crossfit.enabled=false",
]


def fixture_texts() -> dict[str, list[str]]:
    """Every distinct utterance of each intent, in template order."""
    out = {}
    for label, templates in INTENT_TEMPLATES.items():
        texts = []
        for template in templates:
            slot = "amount" if "{amount}" in template else "x"
            texts.extend(" ".join(template.format(**{slot: f}).split()) for f in FILLERS[slot])
        out[label] = list(dict.fromkeys(texts))
    return out


def fixture_rows() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic (train, test) rows as the dataset files hold them: 1 utterance in 4 of each intent is test."""
    train, test = [], []
    for label, texts in fixture_texts().items():
        for i, text in enumerate(texts):
            (test if i % 4 == 3 else train).append((text, label))
    return train, test


def fixture_frames() -> dict[str, pd.DataFrame]:
    """train/val/test frames (text, label, origin_split, source_id) as `split` writes them: the dataset's test
    rows, and 1 train row in 5 of each intent held out for val."""
    train, test = fixture_rows()
    seen: dict[str, int] = {}
    rows = []
    for text, label in train:
        seen[label] = seen.get(label, 0) + 1
        rows.append((text, label, "train", "val" if seen[label] % 5 == 0 else "train"))
    rows += [(text, label, "test", "test") for text, label in test]
    df = pd.DataFrame(rows, columns=["text", "label", "origin_split", "split"])
    df["source_id"] = [f"fixture:{i}" for i in range(len(df))]
    return {s: g.drop(columns="split").reset_index(drop=True) for s, g in df.groupby("split")}


def write_fixture_project(root: Path, cfg, encoder=None) -> None:
    """Write the fixture splits, taxonomy and embeddings at cfg.paths under `root`, as `split` and `embed` would."""
    from intentops.io import write_json, write_parquet
    from intentops.models.encoder import load_encoder, run_embed

    frames = fixture_frames()
    for split, frame in frames.items():
        write_parquet(root / cfg.paths[split], frame)
    write_json(
        root / cfg.paths.taxonomy, {"labels": list(INTENT_TEMPLATES), "oos_label": None, "source": "fixture"}
    )
    encoder = encoder or load_encoder(cfg.embed.model)
    emb_dir = root / cfg.paths.embeddings_dir
    emb_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        np.save(
            emb_dir / f"{split}.npy",
            run_embed(encoder, frame["text"].tolist(), layers=cfg.embed.get("layers")),
        )


def to_csv(rows: list[tuple[str, str]], header=("text", "category")) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_mirror(root: Path, train=None, test=None, categories=None) -> dict[str, str]:
    """Write a mirror laid out like ../shared/datasets/banking77; return the sha256 of each file."""
    tr, te = fixture_rows()
    files = {
        "train.csv": train if train is not None else to_csv(tr),
        "test.csv": test if test is not None else to_csv(te),
        "categories.json": categories
        if categories is not None
        else json.dumps(sorted(INTENT_TEMPLATES)).encode(),
    }
    d = root / "banking77"
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: sha256(data) for name, data in files.items()}


def fixture_overrides(shas: dict[str, str], extra: list[str] | None = None) -> list[str]:
    """SMALL, the fixture files' sha256 pins, then `extra`."""
    return [
        *SMALL,
        f"data.files.train.sha256={shas['train.csv']}",
        f"data.files.test.sha256={shas['test.csv']}",
        f"data.taxonomy.sha256={shas['categories.json']}",
        *(extra or []),
    ]


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; return the completed process."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(dest: Path, overrides: list[str]) -> Path:
    """A real git + DVC repo holding this project's pipeline, with params composed from conf/ plus overrides."""
    return create_project(dest, overrides, root=ROOT)


def tiny_onnx_graph(n_features: int, n_labels: int, confident: bool) -> bytes:
    """A serialised ONNX graph with export's interface: input_ids, attention_mask (b, L) int64 and tfidf (b, V)
    float32 -> logits (b, k) = tfidf @ W + bias, embedding (b, 8) = tfidf @ P.

    W is small (|logit change| < 0.5 for a unit-norm TF-IDF row), so the bias decides: 20 on column 0 when
    `confident` (every text goes there with confidence ~1), 0 otherwise (near uniform).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    bias = np.zeros(n_labels, np.float32)
    bias[0] = 20.0 if confident else 0.0
    weights = {
        "W": (rng.standard_normal((n_features, n_labels)) * 0.1).astype(np.float32),
        "bias": bias,
        "P": rng.standard_normal((n_features, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["tfidf", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("MatMul", ["tfidf", "P"], ["embedding"]),
    ]
    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ids),
            helper.make_tensor_value_info("tfidf", TensorProto.FLOAT, ["batch", n_features]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    # IR 8 / opset 17: what export writes, and what every supported onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_tiny_onnx_bundle(dest: Path, labels: list[str], confident: bool, card: dict | None = None) -> str:
    """A real, sealed ONNX bundle that `Predictor.load` serves, written in well under a second; returns its version.

    The packaged MiniLM tokenizer (as export writes it), a TF-IDF union fitted on the fixture texts (the
    minilm_head featurizer's settings), and `tiny_onnx_graph` over it: confident=True sends every text to
    labels[0] with confidence ~1 (never reviewed), confident=False is near uniform (always reviewed). No
    calibrated review thresholds, so serving's configured ones apply.
    """
    import joblib

    from intentops.inference import bundle as layout
    from intentops.io import write_json
    from intentops.models.encoder import resolve_encoder
    from intentops.models.tfidf import make_tfidf
    from intentops.stages.export import write_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    max_seq_length = 128
    write_tokenizer(Path(resolve_encoder(None)), dest / layout.TOKENIZER_FILE, max_seq_length)
    tfidf = make_tfidf(word_ngram=(1, 2), char_ngram=(2, 5), min_df=2)
    tfidf.fit([t for texts in fixture_texts().values() for t in texts])
    joblib.dump(tfidf, dest / layout.TFIDF_FILE)
    n_features = len(tfidf.get_feature_names_out())
    (dest / layout.ONNX_FILE).write_bytes(tiny_onnx_graph(n_features, len(labels), confident))
    write_json(dest / layout.LABELS_FILE, list(labels))
    write_json(dest / layout.CALIBRATION_FILE, {"temperature": 1.0, "ood": {}})
    write_json(dest / layout.CARD_FILE, {"model": "tiny", **(card or {})})
    meta = {
        "format": "onnx",
        "model": "tiny",
        "model_file": layout.ONNX_FILE,
        "variants": {"fp32": layout.ONNX_FILE},
        "inputs": ["input_ids", "attention_mask", "tfidf"],
        "outputs": ["logits", "embedding"],
        "opset": 17,
        "max_seq_length": max_seq_length,
        "session": {"intra_op_num_threads": 1},
    }
    write_json(dest / layout.BUNDLE_META, meta)
    return layout.seal(dest)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def new_store(db: Path) -> Path:
    """An empty feedback store at `db` (SQLite, migrated to the head revision); returns `db`."""
    from intentops.feedback import store

    engine = store.make_engine(f"sqlite:///{db}")
    try:
        store.upgrade(engine)
    finally:
        engine.dispose()
    return db


@contextlib.contextmanager
def serve_on_loopback() -> Iterator[str]:
    """Ray (2 CPUs, no dashboard) and Serve's proxy on a free loopback port, one per test module: yields the
    origin URL, then shuts Serve and Ray down."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy_intent_service(
    user_config: dict,
    app: str = "intentops",
    route_prefix: str = "/",
    env: dict[str, str] | None = None,
    deployment: str = "IntentService",
    num_cpus: float = 1,
) -> None:
    """Deploy IntentService as Serve app `app` (or reconfigure it in place: Serve applies a changed user_config
    without a restart), its routes on the replica's own event loop as serving/config.yaml deploys it."""
    from ray import serve

    from intentops.api.service import IntentService

    env_vars = {"INTENTOPS_ROOT": str(ROOT), "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **(env or {})}
    service = IntentService.options(
        name=deployment,
        user_config=user_config,
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": env_vars}},
        logging_config={"encoding": "JSON", "enable_access_log": False},
    )
    serve.run(service.bind(), name=app, route_prefix=route_prefix)


@contextlib.contextmanager
def moto_s3(bucket: str = "intentops", host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) with one bucket; yields its URL, stops it afterwards."""
    import boto3

    port = port or free_port(host)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{host}:{port}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stop_processes(pids, grace_s: float, kill_s: float = 10.0, poll_s: float = 0.5) -> None:
    """SIGTERM every pid that `pids()` returns, then SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_s)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids() and time.monotonic() < deadline:
            time.sleep(poll_s)
