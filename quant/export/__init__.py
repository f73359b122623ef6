"""Exports for serving engines, each checked in its own runtime against the PyTorch model: GGUF for llama.cpp
(`gguf`) and ONNX for ONNX Runtime (`onnx`)."""
