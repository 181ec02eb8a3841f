"""`model=minilm_finetune`: all of MiniLM fine-tuned with a linear classifier on its mean-pooled output."""

from __future__ import annotations

import torch
from torch import nn


class MiniLMClassifier(nn.Module):
    """Transformer encoder (AutoModel) -> mean pooling over real tokens -> dropout -> linear.

    Args:
        encoder: HF id or local folder; None = the packaged all-MiniLM-L6-v2.
        vocab_size: accepted for a uniform constructor; the encoder fixes its own vocabulary.
    """

    def __init__(
        self, n_classes: int, encoder: str | None = None, dropout: float = 0.1, vocab_size: int | None = None
    ):
        super().__init__()
        from transformers import AutoModel

        from intentops.models.encoder import resolve_encoder

        # from_pretrained returns eval mode; Lightning keeps submodule modes, so re-enable dropout for training.
        self.encoder = AutoModel.from_pretrained(resolve_encoder(encoder)).train()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (b, L, h)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, h), as sentence-transformers pools
        return self.classifier(self.dropout(pooled))
