"""A small trained model for behavioural tests: a fixture dataset written here, the real config shrunk."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Five intents with paraphrase templates; {x} slots vary the wording so train/val/test differ.
TEMPLATES = {
    "card_arrival": ["when will my card {x} arrive", "my new card {x} has not arrived yet",
                     "how long does the card {x} take to be delivered", "still waiting for my card {x} in the post",
                     "where is my card {x}, it should have come by now", "card {x} delivery is taking ages"],
    "lost_or_stolen_card": ["i lost my card {x}", "my card {x} was stolen", "someone stole my card {x} yesterday",
                            "i cannot find my card {x} anywhere", "please block my card {x}, it is lost",
                            "my wallet with the card {x} got stolen"],
    "exchange_rate": ["what exchange rate do you use {x}", "how much is the euro to dollar rate {x}",
                      "what is the current exchange rate {x}", "which rate do you apply for currency exchange {x}",
                      "is the exchange rate good today {x}", "tell me the conversion rate {x}"],
    "top_up_failed": ["my top up failed {x}", "the top-up did not go through {x}", "i could not top up my account {x}",
                      "top up was declined {x}", "why did my top up fail {x}", "adding money to my account failed {x}"],
    "balance_not_updated_after_bank_transfer": [
        "my balance has not updated after the bank transfer {x}", "transfer arrived but balance is the same {x}",
        "i sent money by bank transfer and my balance did not change {x}",
        "the bank transfer is not showing in my balance {x}", "why is my balance not updated after transfer {x}",
        "my account balance still shows the old amount after the transfer {x}"],
}
FILLERS = ["", "please", "today", "again", "thanks", "now", "urgently", "help", "please help", "asap"]


def fixture_frames(seed: int = 0) -> dict[str, pd.DataFrame]:
    """train/val/test frames (text, label, origin_split, source_id) with no text in two splits."""
    rng = random.Random(seed)
    rows = []
    for label, templates in TEMPLATES.items():
        texts = sorted({" ".join(t.format(x=f).split()) for t, f in itertools.product(templates, FILLERS)})
        rng.shuffle(texts)
        n = len(texts)
        for i, text in enumerate(texts):
            split = "test" if i < n // 5 else "val" if i < n // 5 + n // 10 else "train"
            rows.append({"text": text, "label": label, "split": split})
    df = pd.DataFrame(rows)
    df["origin_split"] = df["split"].replace({"val": "train"})
    df["source_id"] = [f"fixture:{i}" for i in range(len(df))]
    return {s: g.drop(columns="split").reset_index(drop=True) for s, g in df.groupby("split")}


def write_fixture_project(root: Path, cfg, encoder=None) -> None:
    """Write the fixture splits, taxonomy and (when the model reads them) embeddings at cfg.paths under root."""
    from intentops.embed import load_encoder, run_embed
    from intentops.io import write_json, write_parquet

    frames = fixture_frames()
    for split, frame in frames.items():
        write_parquet(root / cfg.paths[split], frame)
    write_json(root / cfg.paths.taxonomy, {"labels": list(TEMPLATES), "oos_label": None, "source": "fixture"})
    encoder = encoder or load_encoder(cfg.embed.model)
    emb_dir = root / cfg.paths.embeddings_dir
    emb_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        np.save(emb_dir / f"{split}.npy", run_embed(encoder, frame["text"].tolist(), layers=cfg.embed.get("layers")))


SMALL = ["logger=none", "trainer.enable_progress_bar=false", "train.inference_sample=16", "train.num_threads=2"]


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
    from intentops.predictor import Predictor
    from intentops.train import train_from_config

    root, _ = small_project
    cfg = compose(SMALL + ["model.max_epochs=30", "model.batch_size=32", "train.patience=30"])
    bundle = tmp_path_factory.mktemp("bundle") / "model"
    metrics = train_from_config(cfg, bundle, tmp_path_factory.mktemp("work"), root=root)
    return Predictor.load(bundle), metrics
