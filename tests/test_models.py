"""Every registered model: right output shape, gradients reach every parameter, no NaN, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MODEL_REGISTRY, build_model
from models.preprocess import Standardized

SHAPES = {"image": (1, 8, 8), "sequence": (1, 40), "any": (1, 40)}


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    shape = SHAPES[MODEL_REGISTRY[name].input_kind]
    model = build_model(name, shape, num_classes=7)
    x = torch.randn(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no usable gradient for {missing}"
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters()), f"{name}: a parameter got a zero gradient"


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_onnx_export_matches_torch(name: str, tmp_path) -> None:
    from pipelines.export.onnx_export import export_onnx
    from pipelines.export.parity import check_parity

    torch.manual_seed(0)
    shape = SHAPES[MODEL_REGISTRY[name].input_kind]
    model = Standardized(build_model(name, shape, num_classes=4), mean=1.5, std=2.0).eval()
    export_onnx(model, shape, tmp_path / "m.onnx", opset=18)
    x = np.random.default_rng(0).normal(size=(33, *shape)).astype(np.float32)  # a batch size never traced
    report = check_parity(model, tmp_path / "m.onnx", x, atol=1e-4)
    assert report.passed, report


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(KeyError, match="registered models: .*cnn2d"):
        build_model("transformer", (1, 8, 8), 10)


def test_wrong_input_rank_is_explained() -> None:
    with pytest.raises(ValueError, match=r"cnn2d.*\(C, H, W\)"):
        build_model("cnn2d", (1, 40), 10)


def test_bad_config_key_names_the_model() -> None:
    with pytest.raises(TypeError, match="gru"):
        build_model("gru", (1, 40), 10, hidden_size=3)
