"""The model's config alone (config.json, no weights): the pruning jobs check its family on it, so that a model they
cannot prune is refused before any weights load (and before transformers prints a load report about them)."""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from distill.core.models import is_compressed, resolve_model


def model_config(name: str) -> PretrainedConfig:
    """The config of the model `name` names (see `resolve_model`)."""
    path = resolve_model(name)
    return AutoConfig.from_pretrained(path, trust_remote_code=is_compressed(path))
