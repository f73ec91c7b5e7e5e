"""Recurrent many-to-one classifiers (GRU, LSTM) for (C, L) sequences.

``forward(x, lengths=None)``: without ``lengths`` every sequence is read to the
end (the path ONNX export traces); with ``lengths`` each sequence is packed so
the recurrence stops at its own last valid step and padding never reaches the
head, in either direction.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.registry import expect_rank, register_model


class RecurrentClassifier(nn.Module):
    """An RNN over time steps; the last hidden state (both directions if bidirectional) feeds a linear head."""

    def __init__(
        self,
        cell: type[nn.RNNBase],
        in_channels: int,
        num_classes: int,
        hidden: int,
        layers: int,
        bidirectional: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.rnn = cell(
            in_channels,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            # torch applies RNN dropout only between stacked layers and warns otherwise.
            dropout=dropout if layers > 1 else 0.0,
        )
        directions = 2 if bidirectional else 1
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(directions * hidden, num_classes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C, L) → (B, L, C): time runs along the sequence, channels are the features.
        steps = x.transpose(1, 2)
        if lengths is None:
            _, state = self.rnn(steps)
        else:
            _check_lengths(lengths, batch=x.shape[0], max_length=x.shape[2])
            # enforce_sorted=False: callers keep their batch order; torch un-sorts the final state.
            packed = pack_padded_sequence(steps, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, state = self.rnn(packed)
        hidden = state[0] if isinstance(state, tuple) else state  # an LSTM's state is (h, c)
        directions = 2 if self.rnn.bidirectional else 1
        last = hidden[-directions:].transpose(0, 1).reshape(x.shape[0], -1)
        return self.head(last)


def _check_lengths(lengths: torch.Tensor, batch: int, max_length: int) -> None:
    """Wrong lengths would silently read padding or crash inside packing; say which rule broke."""
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), one per sequence; got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > max_length:
        raise ValueError(f"lengths must lie in [1, {max_length}] (the padded length); got {lengths.tolist()}")


class GRUClassifier(RecurrentClassifier):
    """Many-to-one GRU."""

    def __init__(
        self, in_channels: int, num_classes: int, hidden: int, layers: int, bidirectional: bool, dropout: float
    ) -> None:
        super().__init__(nn.GRU, in_channels, num_classes, hidden, layers, bidirectional, dropout)


class LSTMClassifier(RecurrentClassifier):
    """Many-to-one LSTM: the hidden state h (not the cell state c) of the last step feeds the head."""

    def __init__(
        self, in_channels: int, num_classes: int, hidden: int, layers: int, bidirectional: bool, dropout: float
    ) -> None:
        super().__init__(nn.LSTM, in_channels, num_classes, hidden, layers, bidirectional, dropout)


@register_model("gru", input_kind="sequence")
def build_gru(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 64,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Many-to-one GRU for (C, L) sequences."""
    expect_rank("gru", input_shape, 2, "(C, L)")
    return GRUClassifier(input_shape[0], num_classes, hidden, layers, bidirectional, dropout)


@register_model("lstm", input_kind="sequence")
def build_lstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 64,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Many-to-one LSTM for (C, L) sequences."""
    expect_rank("lstm", input_shape, 2, "(C, L)")
    return LSTMClassifier(input_shape[0], num_classes, hidden, layers, bidirectional, dropout)


class LengthAwareRecurrent(nn.Module):
    """A trained :class:`RecurrentClassifier` as a graph that takes ``lengths`` and never packs.

    Packing does not export to ONNX, so this module computes the same answer with plain
    tensor ops: each direction of each layer is its own single-layer RNN (weights copied
    from the trained one, nothing retrained); the forward direction's state at each
    sequence's own last step is gathered from its outputs (a causal RNN's output at step
    ``t`` never saw later steps, padding included), and the backward direction runs over
    each sequence reversed within its own length, so it starts at the sequence's last
    valid step, as packing makes it. Built at export time; training keeps the packed path.
    """

    def __init__(self, trained: RecurrentClassifier) -> None:
        super().__init__()
        rnn = trained.rnn
        cell = type(rnn)
        self.layers_count = rnn.num_layers
        self.directions = 2 if rnn.bidirectional else 1
        self.steps = nn.ModuleList()
        for layer in range(rnn.num_layers):
            size = rnn.input_size if layer == 0 else rnn.hidden_size * self.directions
            for direction in range(self.directions):
                single = cell(size, rnn.hidden_size, num_layers=1, batch_first=True)
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                with torch.no_grad():
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(single, f"{name}_l0").copy_(getattr(rnn, f"{name}{suffix}"))
                self.steps.append(single)
        self.head = trained.head

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = x.transpose(1, 2)  # (B, L, C)
        length = steps.shape[1]
        lengths = lengths.reshape(-1, 1).to(torch.int64)
        t = torch.arange(length, device=x.device).unsqueeze(0)
        # Step t of the reversed sequence is step len-1-t of the original; padding stays where it is.
        reverse = torch.where(t < lengths, lengths - 1 - t, t)
        last = (lengths - 1).clamp(min=0)
        inputs, forward_out, backward_out = steps, steps, steps
        for layer in range(self.layers_count):
            forward_out = self.steps[layer * self.directions](inputs)[0]
            outputs = [forward_out]
            if self.directions == 2:
                index = reverse.unsqueeze(-1).expand(-1, -1, inputs.shape[-1])
                reversed_out = self.steps[layer * self.directions + 1](torch.gather(inputs, 1, index))[0]
                back = reverse.unsqueeze(-1).expand(-1, -1, reversed_out.shape[-1])
                backward_out = torch.gather(reversed_out, 1, back)  # in the original time order
                outputs.append(backward_out)
            inputs = torch.cat(outputs, dim=-1)
        hidden = forward_out.shape[-1]
        final = [torch.gather(forward_out, 1, last.unsqueeze(-1).expand(-1, 1, hidden)).squeeze(1)]
        if self.directions == 2:
            final.append(backward_out[:, 0])  # the backward pass ends at each sequence's first step
        return self.head(torch.cat(final, dim=-1))
