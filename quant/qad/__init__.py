"""Quantization-aware distillation: a quantized student learns from its full-precision teacher (`qlora`: LoRA
adapters on a bitsandbytes 4-bit or 8-bit base)."""
