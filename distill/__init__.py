"""Distillation for Hugging Face transformers: configs, data sources, losses, students and the training loop."""
from .config import ConfigError, DistillConfig, FinetuneConfig, parse_args

__all__ = ["ConfigError", "DistillConfig", "FinetuneConfig", "parse_args"]
