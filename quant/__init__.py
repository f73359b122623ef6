"""Quantization, one room per concern: the ways of quantizing weights (`schemes`), quantization-aware distillation
(`qad`), exports checked in their serving runtime (`export`: GGUF, ONNX) and measurement (`measure`: reports,
generation speed). The jobs are one module each (`quantize`, `quantize_lm`; the exporters' jobs live with them) and
`stages` registers them as pipeline stage kinds."""
