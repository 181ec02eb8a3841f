"""Test support: a small Banking77-shaped dataset the tests write themselves, and a real DVC repo."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A few real Banking77 intents, each with templates × fillers, so a tiny model can actually learn them.
INTENT_TEMPLATES: dict[str, list[str]] = {
    "card_arrival": [
        "When will my {card} arrive?", "My {card} still hasn't arrived", "How long until my {card} is delivered?",
        "I am still waiting for my {card}", "Where is my {card}? It has not come yet",
    ],
    "lost_or_stolen_card": [
        "I lost my {card}", "Someone stole my {card}", "My {card} was stolen yesterday",
        "I can't find my {card} anywhere", "Please block my {card}, it is lost",
    ],
    "exchange_rate": [
        "What is the exchange rate for {currency}?", "How much is {currency} worth today?",
        "Which rate do you use to convert {currency}?", "Tell me the current {currency} exchange rate",
        "Is the {currency} rate good right now?",
    ],
    "top_up_failed": [
        "My top up with my {card} failed", "Why did my top-up fail?", "The top up didn't go through on my {card}",
        "I tried to top up {amount} but it failed", "Top up of {amount} was declined",
    ],
    "pin_blocked": [
        "My PIN is blocked", "I entered the wrong PIN too many times on my {card}", "How do I unblock my PIN?",
        "My {card} PIN got locked", "Unblock the PIN on my {card} please",
    ],
}
FILLERS = {
    "card": ["card", "new card", "debit card", "visa card"],
    "currency": ["euro", "dollar", "pound", "yen"],
    "amount": ["£20", "$50", "100 euros", "£5"],
}


def fixture_rows() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic (train, test) rows: every distinct utterance, 1 in 4 kept for test."""
    train, test = [], []
    for label, templates in INTENT_TEMPLATES.items():
        texts = []
        for t in templates:
            slots = [k for k in FILLERS if "{" + k + "}" in t]
            if not slots:
                texts.append(t)
            for k in slots:
                texts.extend(t.format(**{k: v}) for v in FILLERS[k])
        for i, text in enumerate(dict.fromkeys(texts)):
            (test if i % 4 == 3 else train).append((text, label))
    return train, test


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
        "categories.json": categories if categories is not None else json.dumps(sorted(INTENT_TEMPLATES)).encode(),
    }
    d = root / "banking77"
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: sha256(data) for name, data in files.items()}


def fixture_overrides(shas: dict[str, str], extra: list[str] | None = None) -> list[str]:
    """Hydra overrides that pin the fixture files' sha256 and shrink validation for 5 small classes."""
    return [
        f"data.files.train.sha256={shas['train.csv']}",
        f"data.files.test.sha256={shas['test.csv']}",
        f"data.taxonomy.sha256={shas['categories.json']}",
        "validate.min_examples_per_class=5",
        "split.val_fraction=0.2",
        *(extra or []),
    ]


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; return the completed process."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(dest: Path, overrides: list[str]) -> Path:
    """A real git + DVC repo holding this project's pipeline, with params composed from conf/ plus overrides."""
    from intentops.config import write_params

    dest.mkdir(parents=True, exist_ok=True)
    for item in ("conf", "src", "dvc.yaml", "data/external", "data/feedback/labels.csv"):
        src = ROOT / item
        (dest / item).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / item)
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    cwd = os.getcwd()
    try:
        os.chdir(dest)
        write_params(dest / "params.yaml", overrides)
    finally:
        os.chdir(cwd)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dest)
    return dest
