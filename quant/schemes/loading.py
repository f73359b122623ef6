"""Loading a saved model for quantization, and choosing which of its modules stay in full precision.

The Auto class follows the checkpoint's architecture (a sequence classifier or a causal LM); remote code is
trusted only for checkpoints this framework compressed, as in `distill.core.models.load_classifier`, so pruned models
(with `config.compression` and `modeling_compressed.py`) quantize and reload like stock ones.

Skip lists use transformers' matching for `llm_int8_skip_modules` (a path prefix, a regex, or a name suffix), so
bitsandbytes, dynamic int8 and the report agree on which Linears a variant quantizes."""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.quantizers.quantizers_utils import should_convert_module

from distill.core.arch import arch_of, task_head_paths
from distill.core.errors import ConfigError
from distill.core.models import is_compressed, resolve_model

PURPOSE = "quantization"
AUTO_CLASSES = {"ForSequenceClassification": AutoModelForSequenceClassification, "ForCausalLM": AutoModelForCausalLM}


def load_config(name: str) -> PretrainedConfig:
    """The config of a supported architecture with a supported head, or a ConfigError naming what is not."""
    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=is_compressed(path))
    arch_of(config, PURPOSE)
    auto_class(config)
    return config


def auto_class(config: PretrainedConfig) -> type:
    architectures = config.architectures or []
    for suffix, cls in AUTO_CLASSES.items():
        if any(name.endswith(suffix) for name in architectures):
            return cls
    raise ConfigError(f"{PURPOSE} supports sequence classifiers and causal LMs; the checkpoint's architectures are "
                      f"{architectures or 'not recorded'}")


def load_pretrained(name: str, **kwargs) -> PreTrainedModel:
    """`from_pretrained` with the right Auto class, in eval mode; `kwargs` go to `from_pretrained`."""
    config = load_config(name)
    path = resolve_model(name)
    return auto_class(config).from_pretrained(path, trust_remote_code=is_compressed(path), **kwargs).eval()


def empty_model(name: str) -> PreTrainedModel:
    """The model's modules on the meta device (no weights read), to resolve module paths before loading."""
    config = load_config(name)
    with torch.device("meta"):
        return auto_class(config).from_config(config, trust_remote_code=is_compressed(resolve_model(name)))


def skip_patterns(model: PreTrainedModel, override: list[str] | None = None) -> list[str]:
    """Modules to keep in full precision: the architecture's task heads, pooler and LM head, or `override`
    (each entry must match some module)."""
    if override is None:
        return task_head_paths(model, PURPOSE)
    arch_of(model, PURPOSE)
    names = [name for name, _ in model.named_modules() if name]
    for pattern in override:
        if all(should_convert_module(name, [pattern]) for name in names):
            raise ConfigError(f"skip_modules entry '{pattern}' matches no module of {type(model).__name__}")
    return list(override)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and its bitsandbytes subclasses, and PyTorch's quantized Linears."""
    return isinstance(module, (nn.Linear, torch.ao.nn.quantized.Linear))


def target_linears(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """The Linears a variant quantizes: every Linear that `skip` does not match."""
    return {name: module for name, module in model.named_modules()
            if is_linear(module) and should_convert_module(name, skip)}
