"""The model: architecture, losses, named configs, checkpoints, loading for inference, ONNX, the Python API."""
