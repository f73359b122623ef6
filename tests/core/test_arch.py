"""Per-architecture facts (`distill.core.arch`) on a tiny model of every supported family: the layer list and its
path, the Linears each layer's entry names, the task heads quantization keeps, Phi-3's fused rows split into query,
key and value (and gate and up), and a config cut to some layers keeping their per-layer fields."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from distill.core.arch import (
    ARCHS,
    arch_of,
    base_model_path,
    config_for_layers,
    ffn_in_weights,
    kv_group_size,
    layer_list,
    layer_list_path,
    qkv_weights,
    task_head_paths,
)
from distill.core.errors import ConfigError

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN = 3, 4, 2, 8, 32, 48
SMALL = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=FFN, max_position_embeddings=64,
             pad_token_id=0, eos_token_id=1, bos_token_id=1)
ENCODERS = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra"}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def tiny(model_type: str, auto=AutoModelForCausalLM, **overrides):
    torch.manual_seed(0)
    return auto.from_config(AutoConfig.for_model(model_type, **{**SMALL, **overrides})).eval()


CASES = ([(family, AutoModelForSequenceClassification, f"{prefix}.encoder.layer", prefix,
           [f"{prefix}.pooler", "classifier"] if family == "bert" else ["classifier"])
          for family, prefix in ENCODERS.items()]
         + [(family, AutoModelForCausalLM, "model.layers", "model", ["lm_head"]) for family in DECODERS]
         + [("llama", AutoModelForSequenceClassification, "model.layers", "model", ["score"])])


def test_every_supported_family_is_covered_here():
    assert set(ARCHS) == set(ENCODERS) | set(DECODERS)


@pytest.mark.parametrize("family, auto, layers_path, base, heads", CASES,
                         ids=[f"{case[0]}-{case[1].__name__[12:]}" for case in CASES])
def test_layer_list_paths_and_task_heads_of_each_family(family, auto, layers_path, base, heads):
    model = tiny(family, auto)
    arch = arch_of(model)
    layers = layer_list(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
    assert model.get_submodule(layer_list_path(model)) is layers and layer_list_path(model) == layers_path
    assert base_model_path(model) == base
    for path in (arch.query, arch.key, arch.value, arch.attention_out, *arch.ffn_in, arch.ffn_out):
        assert all(isinstance(layer.get_submodule(path), nn.Linear) for layer in layers), path
    assert task_head_paths(model) == heads


def test_an_unsupported_family_is_refused_naming_the_purpose():
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported for layer copying; supported: bert"):
        layer_list(tiny("gpt2", n_layer=1, n_embd=HIDDEN, n_head=HEADS, n_positions=64))


def test_separate_projections_are_returned_as_they_are():
    layer = layer_list(tiny("llama"))[0]
    q, k, v = qkv_weights(layer, arch_of(tiny("llama")), HEAD_DIM)
    attention = layer.self_attn
    assert q is attention.q_proj.weight and k is attention.k_proj.weight and v is attention.v_proj.weight
    assert kv_group_size(tiny("llama").config) == HEADS // KV_HEADS


def test_fused_rows_split_into_query_key_value_and_gate_up():
    model = tiny("phi3")
    arch, layer = arch_of(model), layer_list(model)[1]
    q, k, v = qkv_weights(layer, arch, HIDDEN // HEADS)
    assert (q.shape[0], k.shape[0], v.shape[0]) == (HEADS * 8, KV_HEADS * 8, KV_HEADS * 8)
    assert torch.equal(torch.cat([q, k, v]), layer.self_attn.qkv_proj.weight)
    gate, up = ffn_in_weights(layer, arch)
    assert gate.shape == up.shape == (FFN, HIDDEN)
    assert torch.equal(torch.cat([gate, up]), layer.mlp.gate_up_proj.weight)


def test_a_config_for_some_layers_keeps_their_per_layer_fields():
    config = AutoConfig.for_model("qwen2", **{**SMALL, "num_hidden_layers": 4}, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=2)
    kinds = list(config.layer_types)
    assert kinds[1] != kinds[3]  # layer 1 attends fully, layer 3 through the window
    cut = config_for_layers(config, [1, 3])
    assert cut.num_hidden_layers == 2 and cut.layer_types == [kinds[1], kinds[3]] and cut.max_window_layers == 1
    assert config.num_hidden_layers == 4  # a copy: the original is unchanged

    config.compression = {"linear_shapes": {"layers.1.mlp.up_proj": [40, 32], "layers.2.mlp.up_proj": [36, 32],
                                            "layers.3.mlp.up_proj": [30, 32], "lm_head": [64, 32]}, "other": 1}
    assert config_for_layers(config, [1, 3]).compression == {
        "linear_shapes": {"layers.0.mlp.up_proj": [40, 32], "layers.1.mlp.up_proj": [30, 32], "lm_head": [64, 32]},
        "other": 1}
