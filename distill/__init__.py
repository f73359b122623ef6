"""Distillation for Hugging Face transformers: `core` (the runtime every job shares), `losses` (registered by name),
`methods` (the classifier jobs), `lm` (the causal-LM jobs) and `pipeline` (stages from teacher to served model)."""
