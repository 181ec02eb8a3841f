"""Stage `embed`: encode every split with a frozen sentence encoder, once, so head changes never re-encode."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from intentops.config import check_stage_args, load_params
from intentops.data.splits import SPLITS
from intentops.errors import cli_entry
from intentops.io import atomic_path, write_json
from intentops.models.encoder import check_layers, encoder_identity, load_encoder, run_embed

log = logging.getLogger(__name__)


@cli_entry
def main() -> None:
    cfg = load_params()
    paths, ecfg = cfg.paths, cfg.embed
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoder = load_encoder(ecfg.model)
    if ecfg.get("max_seq_length"):
        encoder.max_seq_length = int(ecfg.max_seq_length)
    layers = check_layers(ecfg.get("layers"), int(encoder[0].auto_model.config.num_hidden_layers))
    with atomic_path(paths.embeddings_dir) as tmp:
        tmp.mkdir(parents=True)
        shapes = {}
        for split in SPLITS:
            texts = pd.read_parquet(paths[split], columns=["text"])["text"].tolist()
            log.info("embed: encoding %d %s sentences", len(texts), split)
            vecs = run_embed(encoder, texts, ecfg.batch_size, desc=f"embed: {split}", layers=layers)
            np.save(Path(tmp) / f"{split}.npy", vecs)
            shapes[split] = list(vecs.shape)
        write_json(
            Path(tmp) / "meta.json",
            {
                "encoder": encoder_identity(ecfg.model),
                "shapes": shapes,
                "max_seq_length": encoder.max_seq_length,
                "layers": layers,
            },
        )
    log.info("embed: wrote %s", shapes)


if __name__ == "__main__":
    check_stage_args("embed", __doc__)  # --help, or exit 2 on any argument
    main()
