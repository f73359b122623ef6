"""Hidden-channel (embedding) pruning, Minitron's width axis: the same channels of the residual stream are removed
everywhere it is read or written, so the result is the stock architecture at a smaller `hidden_size`: the embedding's
columns (a tied LM head shares them), every norm of the stream (in each layer and the final one), the input columns
of the Linears that read the stream (query/key/value, the FFN inputs, an untied LM head) and the output rows of those
that write it (the attention output, the FFN output). Head size, head counts and FFN width do not change."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.core.arch import arch_of, head_dim, layer_list
from distill.core.errors import ConfigError
from prune.importance import stream_norms
from prune.surgery import keep_inputs, keep_outputs

PURPOSE = "hidden-size pruning"


def prune_hidden(model: PreTrainedModel, keep: list[int]) -> None:
    """Keep only the residual-stream channels `keep` (indices into the current ones)."""
    arch = arch_of(model, PURPOSE)
    if not arch.decoder:
        raise ConfigError("hidden-size pruning supports decoder LMs; encoders keep their hidden size")
    config = model.config.get_text_config()
    config.head_dim = head_dim(config)  # pinned before the hidden size changes: some families derive it from that
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[1]
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= width:
        raise ConfigError(f"hidden channels to keep must be a non-empty subset of 0..{width - 1}")
    index = torch.tensor(keep, dtype=torch.long)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    with torch.no_grad():
        embedding.weight = nn.Parameter(embedding.weight[:, index].clone())
    embedding.embedding_dim = len(keep)
    if tied:
        head.weight = embedding.weight
        head.in_features = len(keep)
    elif head is not None:
        keep_inputs(model, output_head_path(model), index)
    for layer in layer_list(model, PURPOSE):
        for path in (*arch.attention_inputs(), *arch.ffn_in):
            keep_inputs(layer, path, index)
        for path in (arch.attention_out, arch.ffn_out):
            keep_outputs(layer, path, index)
        for norm in stream_norms(layer, width):
            keep_norm_channels(norm, index)
    for norm in stream_norms(final_norms(model, arch), width):
        keep_norm_channels(norm, index)
    rescale_embedding(embedding, len(keep))
    config.hidden_size = len(keep)


def output_head_path(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def final_norms(model: PreTrainedModel, arch) -> nn.Module:
    """The base model without its layers and embeddings: what holds the final norm."""
    base = model.base_model
    layers, embedding = base.get_submodule(arch.layers), model.get_input_embeddings()
    holder = nn.Module()
    for name, module in base.named_children():
        if module is not layers and module is not embedding:
            holder.add_module(name, module)
    return holder


def keep_norm_channels(norm: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        norm.weight = nn.Parameter(norm.weight[index].clone())
        if getattr(norm, "bias", None) is not None:
            norm.bias = nn.Parameter(norm.bias[index].clone())
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(index),)


def rescale_embedding(embedding: nn.Module, width: int) -> None:
    """Gemma scales its embeddings by sqrt(hidden_size): a reloaded model computes the scale from the new config, so
    the pruned model in memory must use the same."""
    if hasattr(embedding, "embed_scale"):
        embedding.scalar_embed_scale = width ** 0.5
        embedding.embed_scale.fill_(width ** 0.5)
