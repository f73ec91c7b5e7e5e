"""Models for tables: rows of encoded, standardised features (models/preprocess.py's TableInput).

A table's columns have no order and no neighbourhood, so its models are feed-forward: a
linear layer (logistic or linear regression, the reference every deep model must beat) and a
multilayer perceptron with batch normalisation and dropout, whose width and depth
``model.name: auto`` searches.
"""

from __future__ import annotations

import torch.nn as nn

from models.registry import expect_rank, register_model


class TabularMLP(nn.Module):
    """``depth`` blocks of Linear → BatchNorm → ReLU → Dropout, then a linear head."""

    def __init__(self, features: int, outputs: int, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for block in range(depth):
            layers += [nn.Linear(features if block == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU(),
                       nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width if depth else features, outputs)

    def forward(self, x):  # noqa: ANN001, ANN201 - a tensor in, a tensor out
        # Batch normalisation cannot learn from one row; a last batch of one is passed through in eval mode.
        if self.training and x.shape[0] == 1:
            self.body.eval()
            try:
                return self.head(self.body(x))
            finally:
                self.body.train()
        return self.head(self.body(x))


@register_model("tabular_mlp", input_kind="table")
def build_tabular_mlp(
    input_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 2, dropout: float = 0.1
) -> nn.Module:
    """Feed-forward network for tables: batch norm, dropout (weight decay: train.weight_decay)."""
    expect_rank("tabular_mlp", input_shape, 1, "(features,)")
    return TabularMLP(input_shape[0], num_classes, width, depth, dropout)


class Linear(nn.Module):
    """One linear layer, named ``head`` like every model's last layer (summaries and warm starts find it)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.head = nn.Linear(features, outputs)

    def forward(self, x):  # noqa: ANN001, ANN201 - a tensor in, a tensor out
        return self.head(x)


@register_model("linear", input_kind="table")
def build_linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One linear layer: logistic regression (softmax) or linear regression on the scaled columns."""
    expect_rank("linear", input_shape, 1, "(features,)")
    return Linear(input_shape[0], num_classes)
