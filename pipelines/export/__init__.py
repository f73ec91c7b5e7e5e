"""Export steps: ONNX export, parity against PyTorch, registry and champion promotion."""
