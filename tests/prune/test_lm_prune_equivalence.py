"""Pruning equals masking. For every family that causal-LM pruning supports, the pruned model computes what the
unpruned model computes with the removed units silenced here by hand, without the pruning code: a removed head's
columns of the attention output projection zeroed, a removed FFN neuron's column of the down projection zeroed, a
removed layer skipped (its output replaced by its input), and for hidden channels the definition of
`restrict_stream`. The units removed must be the ones each model was built to make least important (their weights
scaled down a thousandfold, other units in every layer), so a flipped or shared ranking fails as a mis-sliced Linear
(Phi-3's fused qkv_proj and gate_up_proj) does."""
import copy
import math
import random

import pytest
import torch
from torch import nn

from prune.config import DepthConfig, LMPruneConfig, WidthConfig
from prune.lm import Sizes, prune_model
from tests.helpers.families import (
    FAMILIES,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    lm_batch,
    model_inputs,
    tiny_family_model,
)

WEAK = 1e-3
GROUP = HEADS // KV_HEADS
CALIBRATION = [lm_batch(0), lm_batch(1)]
WEAK_GROUPS = [1, 0, 0, 1]
"""Per layer, the key/value group made weak: width.key_value_heads=1 must remove it."""
WEAK_NEURONS = [sorted(random.Random(i).sample(range(FFN), 32)) for i in range(LAYERS)]
"""Per layer, 32 of the 96 FFN neurons made weak: width.intermediate_size=64 must remove them."""
WEAK_CHANNELS = sorted(random.Random(7).sample(range(HIDDEN), 12))
"""12 of the 48 hidden channels made weak: width.hidden_size=36 must remove them."""


def pruned_copy(model: nn.Module, sizes: Sizes, **cfg) -> nn.Module:
    pruned = copy.deepcopy(model)
    prune_model(pruned, LMPruneConfig(importance="activation", **cfg), sizes, CALIBRATION)
    return pruned


def assert_same_logits(pruned: nn.Module, reference: nn.Module) -> None:
    batch = model_inputs(lm_batch(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-5)


def value_rows(attention: nn.Module, group: int) -> tuple[nn.Linear, slice]:
    """The Linear and rows that make key/value group `group`'s values (Phi-3 stacks the query, key and value rows
    in one qkv_proj)."""
    if hasattr(attention, "qkv_proj"):
        start = (HEADS + KV_HEADS + group) * HEAD_DIM
        return attention.qkv_proj, slice(start, start + HEAD_DIM)
    return attention.v_proj, slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)


def up_weight(mlp: nn.Module) -> torch.Tensor:
    """The up projection's weight, one row per neuron (Phi-3's gate_up_proj holds the gate's rows, then these)."""
    return mlp.gate_up_proj.weight[FFN:] if hasattr(mlp, "gate_up_proj") else mlp.up_proj.weight


@torch.no_grad()
def weaken_groups(model: nn.Module) -> None:
    """Tiny values make tiny head outputs: the group's heads rank last."""
    for layer, group in zip(model.model.layers, WEAK_GROUPS):
        linear, rows = value_rows(layer.self_attn, group)
        linear.weight[rows] *= WEAK
        if linear.bias is not None:
            linear.bias[rows] *= WEAK


@torch.no_grad()
def silence_groups(model: nn.Module) -> None:
    for layer, group in zip(model.model.layers, WEAK_GROUPS):
        heads = slice(group * GROUP * HEAD_DIM, (group + 1) * GROUP * HEAD_DIM)
        layer.self_attn.o_proj.weight[:, heads] = 0


@torch.no_grad()
def weaken_neurons(model: nn.Module, neurons: list[list[int]]) -> None:
    for layer, weak in zip(model.model.layers, neurons):
        up_weight(layer.mlp)[weak] *= WEAK


@torch.no_grad()
def silence_neurons(model: nn.Module, neurons: list[list[int]]) -> None:
    for layer, weak in zip(model.model.layers, neurons):
        layer.mlp.down_proj.weight[:, weak] = 0


@torch.no_grad()
def weaken_channels(model: nn.Module) -> None:
    """Nothing writes much into the weak channels of the residual stream: the embedding's columns and the output
    rows of the attention and the FFN scaled down."""
    model.get_input_embeddings().weight[:, WEAK_CHANNELS] *= WEAK
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[WEAK_CHANNELS] *= WEAK
        layer.mlp.down_proj.weight[WEAK_CHANNELS] *= WEAK


def restrict_stream(model: nn.Module, removed: list[int]) -> None:
    """Hidden-channel pruning (Minitron's) defined on the unpruned model: every RMSNorm of the residual stream
    normalises over the kept channels alone and writes zeros on the removed ones; nothing else reads the stream.

    Zeroing the removed channels is not that model: an RMSNorm over all 48 channels, 12 of them zero, divides by
    the RMS over 48, sqrt(36/48) of the RMS over the 36 kept. But an RMSNorm is scale-equivariant, eps aside:
    norm(c x) / c with c^2 = 48/36 and x zero on the removed channels divides x by sqrt(sum(x^2) / 36 + eps), the
    RMS over the kept channels with the same eps. Gemma scales its embedding by sqrt(hidden_size): a Gemma 36 wide
    by sqrt(36)."""
    kept = HIDDEN - len(removed)
    mask, scale = torch.ones(HIDDEN), math.sqrt(HIDDEN / kept)
    mask[removed] = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and module.weight.shape == (HIDDEN,):  # not per-head norms
            module.register_forward_pre_hook(lambda m, args: (args[0] * mask * scale, *args[1:]))
            module.register_forward_hook(lambda m, args, output: output * mask / scale)
    embedding = model.get_input_embeddings()
    if hasattr(embedding, "embed_scale"):
        embedding.register_forward_hook(lambda m, args, output: output * math.sqrt(kept / HIDDEN))


def skip_layers(model: nn.Module, removed: list[int]) -> None:
    def skip(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    for i in removed:
        model.model.layers[i].register_forward_hook(skip, with_kwargs=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_key_value_groups_equals_zeroing_their_heads_outputs(family):
    model = tiny_family_model(family)
    weaken_groups(model)
    pruned = pruned_copy(model, Sizes(None, None, 1, 0))
    silence_groups(model)
    assert_same_logits(pruned, model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_ffn_neurons_equals_zeroing_their_outputs(family):
    model = tiny_family_model(family)
    weaken_neurons(model, WEAK_NEURONS)
    pruned = pruned_copy(model, Sizes(None, FFN - 32, None, 0))
    silence_neurons(model, WEAK_NEURONS)
    assert_same_logits(pruned, model)


def test_non_uniform_ffn_widths_remove_the_weakest_neurons_across_layers():
    weak = [sorted(random.Random(i).sample(range(FFN), n)) for i, n in enumerate([40, 24, 36, 28])]
    model = tiny_family_model("llama")
    weaken_neurons(model, weak)
    pruned = pruned_copy(model, Sizes(None, FFN - 32, None, 0), width=WidthConfig(uniform=False))
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [56, 72, 60, 68]
    silence_neurons(model, weak)
    assert_same_logits(pruned, model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_hidden_channels_equals_normalising_over_the_kept_ones(family):
    model = tiny_family_model(family)
    weaken_channels(model)
    pruned = pruned_copy(model, Sizes(HIDDEN - len(WEAK_CHANNELS), None, None, 0))
    restrict_stream(model, WEAK_CHANNELS)
    assert_same_logits(pruned, model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_explicit_depth_removes_the_listed_layers(family):
    model = tiny_family_model(family)
    pruned = copy.deepcopy(model)
    kept = prune_model(pruned, LMPruneConfig(depth=DepthConfig(strategy="explicit", layers=[2, 0])),
                       Sizes(None, None, None, 2), CALIBRATION)
    assert kept == [1, 3]
    skip_layers(model, [0, 2])
    assert_same_logits(pruned, model)


def labelled_with_own_predictions(model: nn.Module, batch: dict) -> dict:
    """`batch` with the model's own greedy next tokens as labels: any layer that changes its output raises the
    loss."""
    with torch.no_grad():
        predicted = model(**model_inputs(batch)).logits.argmax(-1)
    labels = torch.full_like(predicted, -100)
    labels[:, 1:] = predicted[:, :-1].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return {**batch, "labels": labels}


@pytest.mark.parametrize("strategy", ["perplexity", "block_influence"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_depth_strategies_remove_the_layers_that_do_nothing(family, strategy):
    model = tiny_family_model(family, initializer_range=0.1)  # weights large enough that every other layer matters
    with torch.no_grad():
        for i in (0, 2):  # these layers' outputs equal their inputs
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    batches = [labelled_with_own_predictions(model, batch) for batch in CALIBRATION]
    pruned = copy.deepcopy(model)
    kept = prune_model(pruned, LMPruneConfig(depth=DepthConfig(count=2, strategy=strategy)),
                       Sizes(None, None, None, 2), batches)
    assert kept == [1, 3]
    assert_same_logits(pruned, model)
