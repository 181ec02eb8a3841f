"""`model=bilstm`: a bidirectional LSTM over word-piece embeddings, trained from scratch."""

from __future__ import annotations

import torch
from torch import nn


class BiLSTMClassifier(nn.Module):
    """Embedding -> BiLSTM -> masked max-pool over time -> dropout -> linear."""

    def __init__(
        self,
        vocab_size: int,
        n_classes: int,
        embed_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.dropout(self.embed(input_ids)))  # (b, L, 2h)
        # Padding must never win the max: push it to -inf first.
        out = out.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)  # (b, 2h)
        return self.classifier(self.dropout(out))
