"""Whole-layer dropping: by importance, from the top, or alternate layers from the top (as in layer-dropping
studies), or an explicit list. The kept layers are renumbered so that caches and configs stay consistent."""
from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from distill.core.arch import arch_of, layer_list
from distill.core.errors import ConfigError
from prune.remote_modeling import set_submodule

LAYER_STRATEGIES = ("importance", "top", "alternate", "explicit")


def layers_to_drop(num_layers: int, count: int, strategy: str, scores=None, explicit=None) -> list[int]:
    if strategy not in LAYER_STRATEGIES:
        raise ConfigError(f"layers.strategy must be one of {', '.join(LAYER_STRATEGIES)}; got '{strategy}'")
    if strategy == "explicit":
        drop = sorted(set(explicit or []))
        bad = [i for i in drop if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"layers to drop {bad} out of range: the model has layers 0..{num_layers - 1}")
        count = len(drop)
    if count >= num_layers:
        raise ConfigError(f"dropping {count} of {num_layers} layers would leave none; keep at least one")
    if count < 0:
        raise ConfigError(f"cannot drop a negative number of layers ({count})")
    if strategy == "top":
        return list(range(num_layers - count, num_layers))
    if strategy == "alternate":
        if count > (num_layers + 1) // 2:
            raise ConfigError(f"alternate dropping removes at most {(num_layers + 1) // 2} of {num_layers} layers")
        return sorted(num_layers - 1 - 2 * j for j in range(count))
    if strategy == "importance":
        if scores is None:
            raise ConfigError("layers.strategy 'importance' needs layer scores from a criterion")
        return sorted(scores.argsort()[:count].tolist())
    return drop


def drop_layers(model: PreTrainedModel, drop: list[int]) -> list[int]:
    """Remove layers `drop` in place; returns the original indices of the kept layers."""
    arch, layers = arch_of(model, "layer dropping"), layer_list(model, "layer dropping")
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    if not keep:
        raise ConfigError("dropping every layer leaves none; keep at least one")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    set_submodule(model.base_model, arch.layers, kept)
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return keep
