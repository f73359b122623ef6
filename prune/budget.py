"""A parameter budget as a pruning target: each round removes the configured fraction of the heads and FFN
neurons still there, and the round that would overshoot removes only what the budget needs. The whole plan is
computed before any work, so a budget that cannot be met fails at once."""
from __future__ import annotations

import math

from transformers import PreTrainedModel

from distill.core.arch import arch_of, head_dim, kv_group_size, layer_list
from distill.core.errors import ConfigError
from prune.saving import layer_shapes


def unit_costs(model: PreTrainedModel) -> tuple[int, int]:
    """Parameters owned by one key/value group of heads and by one FFN neuron (read from layer 0)."""
    arch, d, group = arch_of(model, "pruning"), head_dim(model.config), kv_group_size(model.config)
    layer = layer_list(model, "pruning")[0]

    def rows(path: str, count: int) -> int:
        linear = layer.get_submodule(path)
        return count * (linear.in_features + (linear.bias is not None))

    head = rows(arch.query, group * d) + rows(arch.key, d) + rows(arch.value, d)
    head += group * d * layer.get_submodule(arch.attention_out).out_features
    neuron = sum(rows(path, 1) for path in arch.ffn_in) + layer.get_submodule(arch.ffn_out).out_features
    return head, neuron


def budget_plan(model: PreTrainedModel, parameters: int, budget: int, head_fraction: float, ffn_fraction: float,
                max_rounds: int) -> list[tuple[int, int]]:
    """Per round: (key/value groups of heads, FFN neurons) to remove so that the model ends at most at `budget`."""
    shapes, group = layer_shapes(model), kv_group_size(model.config)
    groups, neurons = sum(s["heads"] for s in shapes) // group, sum(s["intermediate"] for s in shapes)
    floor = len(shapes)  # every layer keeps one group and one neuron
    head_cost, neuron_cost = unit_costs(model)
    reachable = parameters - (groups - floor) * head_cost * bool(head_fraction) \
        - (neurons - floor) * neuron_cost * bool(ffn_fraction)
    if budget < reachable:
        raise ConfigError(f"target_parameters={budget:,} is out of reach: pruning every head and FFN neuron it may "
                          f"(each layer keeps one) leaves {reachable:,}")
    plan = []
    while parameters > budget:
        if len(plan) == max_rounds:
            raise ConfigError(f"target_parameters={budget:,} needs more than rounds={max_rounds} rounds at these "
                              "fractions; raise rounds or heads.fraction / ffn.fraction")
        h = min(max(round(head_fraction * groups), bool(head_fraction)), groups - floor)
        n = min(max(round(ffn_fraction * neurons), bool(ffn_fraction)), neurons - floor)
        saved = h * head_cost + n * neuron_cost
        if parameters - saved < budget:  # last round: scale both down to land just under the budget
            scale = (parameters - budget) / saved
            h, n = math.ceil(h * scale), math.ceil(n * scale)
        parameters -= h * head_cost + n * neuron_cost
        groups, neurons = groups - h, neurons - n
        plan.append((h, n))
    return plan
