"""A model's layers, their output shapes and parameter counts, before any training (Keras' ``summary()``).

One forward pass of a zero batch of two through the built model, with a hook on every leaf
module, records what each layer hands on; the parameter counts are the module's own (not its
children's), so the column adds up to the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LayerRow:
    name: str  # dotted path in the module tree
    kind: str  # the module's class
    output_shape: tuple[int | None, ...] | None  # batch dimension as None; None if the layer never ran
    parameters: int
    trainable: int


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layers: list[LayerRow]

    @property
    def parameters(self) -> int:
        return sum(row.parameters for row in self.layers)

    @property
    def trainable(self) -> int:
        return sum(row.trainable for row in self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "parameters": self.parameters, "trainable": self.trainable,
                "layers": [{"name": r.name, "kind": r.kind, "output_shape": list(r.output_shape) if r.output_shape
                            else None, "parameters": r.parameters, "trainable": r.trainable} for r in self.layers]}

    def table(self) -> str:
        """Fixed-width text: layer, kind, output shape, parameters; then the totals."""
        def shape(row: LayerRow) -> str:
            if row.output_shape is None:
                return "—"
            return "(" + ", ".join("N" if s is None else str(s) for s in row.output_shape) + ")"

        rows = [(row.name, row.kind, shape(row), f"{row.parameters:,}") for row in self.layers]
        header = ("layer", "kind", "output shape", "parameters")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        text = [f"{self.name}: input (N, {', '.join(map(str, self.input_shape))}) → {self.num_classes} classes",
                "  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))), line]
        text += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        text += [line, f"total parameters {self.parameters:,} (trainable {self.trainable:,})"]
        return "\n".join(text)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer hands on (an RNN returns (output, state); the output is what the next layer reads)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    data = getattr(output, "data", None)  # a PackedSequence
    return data if isinstance(data, torch.Tensor) else None


def summarize(name: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> ModelSummary:
    """Run a batch of two zeros through ``model`` in eval mode and describe every leaf layer."""
    leaves = [(path, module) for path, module in model.named_modules()
              if path and not any(True for _ in module.children())]
    shapes: dict[str, tuple[int | None, ...]] = {}
    hooks = []
    for path, module in leaves:
        def record(_: nn.Module, __: Any, output: Any, path: str = path) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and path not in shapes:
                shapes[path] = (None, *tensor.shape[1:])

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    rows = []
    for path, module in leaves:
        own = list(module.parameters(recurse=False))
        rows.append(LayerRow(path, type(module).__name__, shapes.get(path), sum(p.numel() for p in own),
                             sum(p.numel() for p in own if p.requires_grad)))
    # Parameters held by a non-leaf module directly (rare: a learned token, a scale) still count.
    for path, module in model.named_modules():
        if any(True for _ in module.children()):
            own = list(module.parameters(recurse=False))
            if own:
                rows.append(LayerRow(path or "(model)", type(module).__name__, None, sum(p.numel() for p in own),
                                     sum(p.numel() for p in own if p.requires_grad)))
    return ModelSummary(name, tuple(input_shape), num_classes, rows)
