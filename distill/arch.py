"""Per-architecture facts in one place: where a model keeps its stack of transformer layers."""
from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from .config import ConfigError

# model_type -> dotted path of the layer list inside a *ForSequenceClassification model
ENCODER_LAYERS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "xlm-roberta": "roberta.encoder.layer",
    "electra": "electra.encoder.layer",
}


def layer_list_path(model: PreTrainedModel) -> str:
    model_type = model.config.model_type
    if model_type not in ENCODER_LAYERS:
        raise ConfigError(
            f"architecture '{model_type}' is not supported for layer copying; supported: {', '.join(ENCODER_LAYERS)}"
        )
    return ENCODER_LAYERS[model_type]


def layer_list(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_submodule(layer_list_path(model))
