"""Structured FFN pruning: intermediate neurons are cut from the input Linears' rows (BERT intermediate, Llama
gate and up) and from the output Linear's columns."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from distill.core.arch import arch_of, layer_list
from distill.core.errors import ConfigError
from prune.saving import layer_shapes
from prune.surgery import keep_inputs, keep_outputs


def prune_ffn(model: PreTrainedModel, keep: dict[int, list[int]]) -> None:
    """Keep, in each listed layer, only the given intermediate neurons."""
    arch, layers, shapes = arch_of(model, "FFN pruning"), layer_list(model, "FFN pruning"), layer_shapes(model)
    for i, neurons in keep.items():
        neurons = sorted(set(neurons))
        width = shapes[i]["intermediate"]
        if not neurons:
            raise ConfigError(f"layer {i} would keep no FFN neuron; each layer keeps at least one")
        if neurons[0] < 0 or neurons[-1] >= width:
            raise ConfigError(f"layer {i} has FFN neurons 0..{width - 1}; cannot keep {neurons[:3]}...")
        index = torch.tensor(neurons, dtype=torch.long)
        if arch.fused_ffn_in:  # gate rows, then up rows
            keep_outputs(layers[i], arch.ffn_in[0], torch.cat([index, width + index]))
        for path in () if arch.fused_ffn_in else arch.ffn_in:
            keep_outputs(layers[i], path, index)
        keep_inputs(layers[i], arch.ffn_out, index)
