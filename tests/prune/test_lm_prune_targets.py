"""A parameter target, over many targets drawn at random (seeded) on a tiny Llama and every choice of target axes: the
pruned model never has more parameters than the target, and never fewer than the target less one rounding step.

A rounding step is what one step of the target's granularity holds, on the unpruned model (where it is largest):
`width.multiple_of` FFN neurons when the FFN is among the axes (it is the finest, and takes what the others leave);
otherwise the largest of one key/value group, one hidden step (a multiple of `multiple_of` and of the query heads
kept, the larger of those over the head counts a target can keep) and one layer, over the axes given. Parameters are
counted on the pruned model itself, and on unpruned models of the sizes in question built here from their config."""
import copy
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.config import LMPruneConfig, WidthConfig
from prune.lm import plan_sizes, prune_model
from tests.helpers.families import FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, family_config, lm_batch, tiny_family_model

STEP = 4
GROUP = HEADS // KV_HEADS


def parameters(**fields) -> int:
    """The parameters of the tiny Llama with these config fields, built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(family_config("llama", **fields)).parameters())


def hidden_step(groups: int) -> int:
    return math.lcm(STEP, groups * GROUP)


def groups_kept(axes: list[str]) -> range:
    return range(1, KV_HEADS + 1) if "heads" in axes else range(KV_HEADS, KV_HEADS + 1)


FULL = parameters()
ONE_STEP = {
    "ffn": lambda axes: FULL - parameters(intermediate_size=FFN - STEP),
    "hidden": lambda axes: FULL - parameters(hidden_size=HIDDEN - max(map(hidden_step, groups_kept(axes)))),
    "heads": lambda axes: FULL - parameters(num_attention_heads=HEADS - GROUP, num_key_value_heads=KV_HEADS - 1),
    "depth": lambda axes: FULL - parameters(num_hidden_layers=LAYERS - 1),
}


def rounding_step(axes: list[str]) -> int:
    return ONE_STEP["ffn"](axes) if "ffn" in axes else max(ONE_STEP[axis](axes) for axis in axes)


def smallest(axes: list[str]) -> int:
    """The smallest model the axes can shrink to: one FFN step, one key/value group, the smallest hidden step, one
    layer."""
    fields = {"ffn": dict(intermediate_size=STEP), "hidden": dict(hidden_size=hidden_step(min(groups_kept(axes)))),
              "heads": dict(num_attention_heads=GROUP, num_key_value_heads=1), "depth": dict(num_hidden_layers=1)}
    return parameters(**{key: value for axis in axes for key, value in fields[axis].items()})


AXES = [["ffn"], ["hidden"], ["heads"], ["depth"], ["hidden", "ffn"], ["hidden", "heads"], ["hidden", "ffn", "heads"]]


@pytest.mark.parametrize("axes", AXES, ids="+".join)
def test_the_pruned_model_is_at_most_the_target_and_within_one_rounding_step_of_it(axes):
    model, low, step = tiny_family_model("llama"), smallest(axes), rounding_step(axes)
    rng = random.Random(0)
    for target in [low, FULL - 1, *(rng.randrange(low, FULL) for _ in range(6))]:
        cfg = LMPruneConfig(target_parameters=target, target_axes=axes, width=WidthConfig(multiple_of=STEP),
                            importance="magnitude")  # which units go does not matter here: no forward passes
        pruned = copy.deepcopy(model)
        prune_model(pruned, cfg, plan_sizes(cfg, model.config), [lm_batch(0)])
        count = sum(p.numel() for p in pruned.parameters())
        assert target - step < count <= target, f"target {target:,}: {count:,} parameters (rounding step {step:,})"
