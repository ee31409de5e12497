"""clip-triton: OpenCLIP -> ONNX -> FP16 -> TensorRT -> Triton model repository, with parity checks."""

__version__ = "0.1.0"
