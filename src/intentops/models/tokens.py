"""Texts -> padded token ids, for the models that read tokens (`minilm_finetune`, `bilstm`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenFeaturizer:
    """Tokenise with a `tokenizer.json` (the `tokenizers` library): {"input_ids", "attention_mask"} (n, L) int64.

    Args:
        tokenizer: a folder holding tokenizer.json, or the file; None = the packaged all-MiniLM-L6-v2.
        max_length: truncate longer utterances (Banking77's longest is ~80 word pieces).
    """

    def __init__(self, tokenizer: str | None = None, max_length: int = 64):
        self.tokenizer_path, self.max_length = tokenizer, max_length
        self._tok = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    @property
    def tok(self):
        if self._tok is None:
            from pathlib import Path

            from tokenizers import Tokenizer

            from intentops.models.encoder import resolve_encoder

            path = Path(resolve_encoder(self.tokenizer_path))
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
            self._tok.enable_truncation(self.max_length)
            self._tok.no_padding()
        return self._tok

    def fit(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> TokenFeaturizer:
        return self  # the vocabulary is fixed by tokenizer.json

    def transform(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> dict:
        encs = self.tok.encode_batch(list(texts))
        ids = np.zeros((len(encs), self.max_length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def net_kwargs(self) -> dict:
        return {"vocab_size": self.tok.get_vocab_size()}
