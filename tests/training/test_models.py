"""Every registered model: right output shape, gradients reach every parameter, no NaN, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MODEL_REGISTRY, build_model
from models.preprocess import Standardized

SHAPES = {"image": (1, 8, 8), "sequence": (1, 40), "any": (1, 40), "table": (12,)}


# Non-default configs whose extra layers (BN, a second direction, a second layer) must train and export too.
VARIANTS = [
    ("mlp", {"batch_norm": True}),
    ("cnn1d", {"batch_norm": True}),
    ("cnn2d", {"batch_norm": False}),
    ("lenet", {"batch_norm": True, "activation": "tanh"}),
    ("resnet_small", {"batch_norm": False, "blocks": 2}),
    ("resnet1d", {"channels": [16, 32, 64], "kernel_size": 3}),
    ("gru", {"bidirectional": True, "layers": 2}),
    ("lstm", {"bidirectional": True, "layers": 2}),
]
CASES = [(name, {}) for name in sorted(MODEL_REGISTRY)] + VARIANTS


def _ids(cases: list[tuple[str, dict]]) -> list[str]:
    return [name + "".join(f"-{k}={v}" for k, v in config.items()) for name, config in cases]


@pytest.mark.parametrize(("name", "config"), CASES, ids=_ids(CASES))
def test_forward_backward(name: str, config: dict) -> None:
    torch.manual_seed(0)
    shape = SHAPES[MODEL_REGISTRY[name].input_kind]
    model = build_model(name, shape, num_classes=7, **config)
    x = torch.randn(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no usable gradient for {missing}"
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters()), f"{name}: a parameter got a zero gradient"


# RNN variants are left out: each recurrent export costs seconds and traces the same code path.
ONNX_CASES = [(name, {}) for name in sorted(MODEL_REGISTRY)] + [("lenet", {"batch_norm": True})]


@pytest.mark.parametrize(("name", "config"), ONNX_CASES, ids=_ids(ONNX_CASES))
def test_onnx_export_matches_torch(name: str, config: dict, tmp_path) -> None:
    from pipelines.export.onnx_export import export_onnx
    from pipelines.export.parity import check_parity

    torch.manual_seed(0)
    shape = SHAPES[MODEL_REGISTRY[name].input_kind]
    model = Standardized(build_model(name, shape, num_classes=4, **config), mean=1.5, std=2.0).eval()
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


# --- config options -------------------------------------------------------------------------

BN_MODELS = {
    "mlp": (1, 40), "cnn1d": (1, 40), "cnn2d": (1, 8, 8), "lenet": (1, 8, 8), "resnet_small": (1, 8, 8), "resnet1d": (1, 40)
}
DROPOUT_MODELS = {**BN_MODELS, "gru": (1, 40), "lstm": (1, 40)}


def _count(model: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", sorted(BN_MODELS))
def test_batch_norm_switch(name: str) -> None:
    shape = BN_MODELS[name]
    with_bn = build_model(name, shape, 3, batch_norm=True)
    without = build_model(name, shape, 3, batch_norm=False)
    assert _count(with_bn, torch.nn.modules.batchnorm._BatchNorm) > 0
    assert _count(without, torch.nn.modules.batchnorm._BatchNorm) == 0
    for model in (with_bn, without):
        assert model(torch.randn(4, *shape)).shape == (4, 3)


def test_batch_norm_build_leaves_running_stats_untouched() -> None:
    # Models that probe their own feature size must not count the probe as training data.
    for name in ("cnn1d", "lenet"):
        model = build_model(name, BN_MODELS[name], 3, batch_norm=True)
        assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if hasattr(m, "num_batches_tracked"))
        assert model.training


@pytest.mark.parametrize("name", sorted(DROPOUT_MODELS))
def test_dropout_is_random_in_training_only(name: str) -> None:
    shape = DROPOUT_MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, shape, 3, dropout=0.5)
    x = torch.randn(4, *shape)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_default_layouts_load_checkpoints_saved_before_the_options() -> None:
    # Adding batch_norm options must not rename the default models' weights.
    assert list(build_model("mlp", (1, 40), 3).state_dict()) == [
        f"net.{i}.{p}" for i in (1, 4, 7) for p in ("weight", "bias")
    ]
    assert list(build_model("cnn1d", (1, 40), 3).state_dict()) == [
        *(f"features.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")), "head.2.weight", "head.2.bias"
    ]


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_directions_and_layers(name: str, bidirectional: bool) -> None:
    model = build_model(name, (2, 12), 3, hidden=8, layers=2, bidirectional=bidirectional, dropout=0.1)
    assert model.rnn.bidirectional is bidirectional and model.rnn.num_layers == 2
    assert model.head[-1].in_features == (16 if bidirectional else 8)
    assert model(torch.randn(5, 2, 12)).shape == (5, 3)


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_lengths_read_each_sequence_to_its_own_end(name: str, bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, (2, 12), 3, hidden=8, layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(3, 2, 12)  # the steps past each length are noise the model must not see
    lengths = torch.tensor([12, 7, 3])
    with torch.no_grad():
        padded = model(x, lengths)
        truncated = torch.cat([model(x[i : i + 1, :, : int(n)]) for i, n in enumerate(lengths)])
        full = model(x)
    torch.testing.assert_close(padded, truncated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], full[0], atol=1e-5, rtol=1e-5)  # full length: same as no lengths
    assert not torch.allclose(padded[1:], full[1:])


@pytest.mark.parametrize(("lengths", "message"), [([3, 0], r"\[1, 6\]"), ([3, 7], r"\[1, 6\]"), ([3], r"shape \(2,\)")])
def test_rnn_bad_lengths_are_explained(lengths: list[int], message: str) -> None:
    model = build_model("gru", (1, 6), 3, hidden=4)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 1, 6), torch.tensor(lengths))


@pytest.mark.parametrize(("shape", "flat"), [((1, 8, 8), 16 * 2 * 2), ((1, 28, 28), 16 * 5 * 5), ((3, 32, 32), 16 * 6 * 6)])
def test_lenet_fits_small_and_classic_images(shape: tuple[int, ...], flat: int) -> None:
    model = build_model("lenet", shape, 10, activation="tanh")
    assert model.classifier[0].in_features == flat  # 28×28 gives LeNet-5's 16×5×5
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_lenet_refuses_tiny_images_and_unknown_activations() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("lenet", (1, 3, 8), 10)
    with pytest.raises(ValueError, match="relu, tanh"):
        build_model("lenet", (1, 8, 8), 10, activation="gelu")


def test_resnet_stages_follow_channels_and_blocks() -> None:
    from models.resnet import BasicBlock

    model = build_model("resnet_small", (3, 28, 28), 10, channels=[8, 16], blocks=2)
    assert _count(model, BasicBlock) == 4
    assert model.head[-1].in_features == 16
    assert model.stages(model.stem(torch.randn(1, 3, 28, 28))).shape == (1, 16, 14, 14)  # one downsampling
    one_d = build_model("resnet1d", (1, 40), 10, channels=32, blocks=[1, 2], kernel_size=3)
    assert _count(one_d, BasicBlock) == 3
    assert one_d.head[-1].in_features == 64  # an int width doubles per stage
    assert one_d(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "config"),
    [("resnet_small", {"channels": [8, 16], "blocks": [1]}), ("resnet1d", {"blocks": 0}), ("resnet1d", {"kernel_size": 4})],
)
def test_resnet_bad_plans_are_explained(name: str, config: dict) -> None:
    with pytest.raises(ValueError, match=name):
        build_model(name, (1, 8, 8) if name == "resnet_small" else (1, 40), 10, **config)


def _recurrent_case(name: str, bidirectional: bool, layers: int):
    """A seeded recurrent model and a padded batch of six sequences of different lengths."""
    torch.manual_seed(0)
    trained = build_model(name, (3, 12), 5, hidden=8, layers=layers, bidirectional=bidirectional).eval()
    x = torch.randn(6, 3, 12)
    lengths = torch.tensor([12, 1, 5, 7, 3, 11])
    for i, n in enumerate(lengths):
        x[i, :, n:] = 0
    return trained, x, lengths


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_length_aware_graph_answers_like_packing(name: str, bidirectional: bool, layers: int) -> None:
    """LengthAwareRecurrent (what export serves) equals the packed forward (what training ran)."""
    from models.rnn import LengthAwareRecurrent

    trained, x, lengths = _recurrent_case(name, bidirectional, layers)
    with torch.no_grad():
        packed = trained(x, lengths)
        gathered = LengthAwareRecurrent(trained).eval()(x, lengths)
        padded = trained(x)  # the padding counted as input: what a length-blind graph would answer
    torch.testing.assert_close(gathered, packed, atol=1e-6, rtol=0)
    assert not torch.allclose(padded, packed, atol=1e-3)  # the lengths matter, so the equality above shows something


# An export takes seconds: two cases cover both cells, both directions' paths and stacking.
@pytest.mark.parametrize(("name", "bidirectional", "layers"), [("gru", True, 2), ("lstm", True, 1)])
def test_the_length_aware_graph_exports_and_answers_like_packing(name: str, bidirectional: bool, layers: int,
                                                                 tmp_path) -> None:
    """The exported ONNX graph, fed the lengths, answers like the packed forward training ran."""
    import onnxruntime as ort

    from models.rnn import LengthAwareRecurrent
    from pipelines.export.onnx_export import export_onnx

    trained, x, lengths = _recurrent_case(name, bidirectional, layers)
    with torch.no_grad():
        packed = trained(x, lengths)
    served = Standardized(LengthAwareRecurrent(trained), 0.0, 1.0).eval()
    export_onnx(served, (3, 12), tmp_path / "m.onnx", 18, with_lengths=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x.numpy(), "lengths": lengths.numpy()})[0]
    np.testing.assert_allclose(onnx_out, packed.numpy(), atol=1e-5)
