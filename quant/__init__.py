"""Post-training quantization: bitsandbytes int8 / NF4 / FP4 (`bnb`), PyTorch dynamic int8 and half precision
(`dynamic`), each variant saved and reloaded (`variants`), and compared on accuracy, memory, size on disk and
latency (`report`, `run`). Quantization-aware distillation (`qat`): LoRA adapters on a 4-bit or 8-bit base,
distilled from the full-precision teacher."""
