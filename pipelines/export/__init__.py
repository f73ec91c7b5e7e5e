"""Export: a run's best checkpoint → ONNX, its parity with PyTorch, the kept variants, the model directory."""
