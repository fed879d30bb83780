"""Model export (ONNX) with parity checks."""
