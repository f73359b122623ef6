"""Structured attention-head pruning: the query/key/value rows and output columns of removed heads are cut out,
so the model really gets smaller. With grouped-query attention only whole key/value groups can go."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from distill.core.arch import arch_of, attention_row_slices, head_dim, kv_group_size, layer_list
from distill.core.errors import ConfigError
from prune.saving import layer_shapes
from prune.surgery import keep_inputs, keep_outputs, unit_rows


def prune_heads(model: PreTrainedModel, keep: dict[int, list[int]]) -> None:
    """Keep, in each listed layer, only the given query heads (indices into that layer's current heads)."""
    arch, d, group = arch_of(model, "head pruning"), head_dim(model.config), kv_group_size(model.config)
    layers, shapes = layer_list(model, "head pruning"), layer_shapes(model)
    for i, heads in keep.items():
        heads = sorted(set(heads))
        check_heads(i, heads, shapes[i]["heads"], group)
        layer = layers[i]
        groups = sorted({h // group for h in heads})
        if arch.fused_qkv:
            q, k, v = attention_row_slices(shapes[i]["heads"], shapes[i]["kv_heads"], d)
            rows = torch.cat([unit_rows(heads, d), k.start + unit_rows(groups, d), v.start + unit_rows(groups, d)])
            keep_outputs(layer, arch.query, rows)
        else:
            keep_outputs(layer, arch.query, unit_rows(heads, d))
            keep_outputs(layer, arch.key, unit_rows(groups, d))
            keep_outputs(layer, arch.value, unit_rows(groups, d))
        keep_inputs(layer, arch.attention_out, unit_rows(heads, d))
        update_head_counts(layer.get_submodule(arch.attention_out.rpartition(".")[0]), len(heads), len(groups))


def update_head_counts(attention, heads: int, kv_heads: int) -> None:
    """Head counts an attention module copied from the config at init (Phi-3 slices its fused projection with
    them): a pruned model in memory must compute what its reloaded copy will."""
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("num_key_value_groups", heads // kv_heads)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def check_heads(layer: int, heads: list[int], available: int, group: int) -> None:
    if not heads:
        raise ConfigError(f"layer {layer} would keep no attention head; each layer keeps at least one")
    if heads[0] < 0 or heads[-1] >= available:
        raise ConfigError(f"layer {layer} has heads 0..{available - 1}; cannot keep {heads}")
    if group > 1:
        for g in {h // group for h in heads}:
            members = list(range(g * group, (g + 1) * group))
            if not set(members) <= set(heads):
                raise ConfigError(
                    f"layer {layer}: keeping heads {heads} splits key/value group {g} (query heads {members}); "
                    f"with grouped-query attention heads go in whole groups of {group}"
                )


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per key/value group: the sum of its query heads' scores."""
    return scores.view(-1, group).sum(-1)


def expand_groups(groups: list[int], group: int) -> list[int]:
    return [g * group + j for g in groups for j in range(group)]
