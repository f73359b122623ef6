"""Structured pruning on tiny random models: shapes really shrink, saved models reload with identical logits,
impossible targets are refused."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from prune.ffn import prune_ffn
from prune.heads import prune_heads
from prune.importance import score
from prune.layers import drop_layers, layers_to_drop
from prune.saving import layer_shapes, save_compressed
from tests.helpers.pruning import TOKENIZER, tiny_encoder, tiny_llama

INPUTS = torch.randint(5, len(TOKENIZER), (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUTS, attention_mask=torch.ones_like(INPUTS)).logits


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_uneven_encoder_pruning_shrinks_and_reloads_with_identical_logits(kind, tmp_path):
    model = tiny_encoder(kind)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, {0: [0, 2], 1: [3], 3: [1, 2, 3]})
    prune_ffn(model, {0: list(range(10)), 2: [5, 7]})
    drop_layers(model, [2])
    expected = logits(model)
    assert layer_shapes(model) == [{"heads": 2, "kv_heads": 2, "intermediate": 10},
                                   {"heads": 1, "kv_heads": 1, "intermediate": 64},
                                   {"heads": 3, "kv_heads": 3, "intermediate": 64}]
    assert sum(p.numel() for p in model.parameters()) < before

    save_compressed(model, TOKENIZER, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "linear_shapes" in config["compression"]
    assert (tmp_path / "m" / "modeling_compressed.py").is_file()
    reloaded = load_classifier(str(tmp_path / "m")).eval()
    assert torch.equal(logits(reloaded), expected)
    assert layer_shapes(reloaded) == layer_shapes(model)


def test_uniform_decoder_pruning_needs_no_remote_code(tmp_path):
    model = tiny_llama()
    prune_heads(model, {i: [2, 3] for i in range(3)})  # key/value group 1 of each layer
    prune_ffn(model, {i: list(range(0, 48, 2)) for i in range(3)})
    drop_layers(model, [1])
    expected = logits(model)
    save_compressed(model, TOKENIZER, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "compression" not in config and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (24, 2)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is LlamaForCausalLM
    assert torch.equal(logits(reloaded), expected)
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1]
    prompt = {"input_ids": INPUTS[:1, :4], "max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    generated = model.generate(**prompt)  # the KV cache indexes the renumbered layers
    assert generated.shape == (1, 7) and torch.equal(reloaded.generate(**prompt), generated)


def test_uneven_decoder_pruning_reloads_through_remote_code(tmp_path):
    model = tiny_llama()
    prune_heads(model, {0: [0, 1], 2: [0, 1, 2, 3]})
    prune_ffn(model, {1: [3, 4, 5]})
    expected = logits(model)
    save_compressed(model, TOKENIZER, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert torch.equal(logits(reloaded), expected)


def test_pruning_heads_equals_zeroing_their_output_columns():
    """Removing a head must change nothing but that head's contribution."""
    model = tiny_encoder()
    masked = tiny_encoder()
    out = masked.bert.encoder.layer[1].attention.output.dense
    with torch.no_grad():
        out.weight[:, 8:16] = 0  # head 1 of 4, head size 8
    prune_heads(model, {1: [0, 2, 3]})
    assert torch.allclose(logits(model), logits(masked), atol=1e-5)


def test_grouped_query_heads_go_in_whole_groups():
    with pytest.raises(ConfigError, match="splits key/value group 0"):
        prune_heads(tiny_llama(), {0: [0, 2, 3]})


@pytest.mark.parametrize("keep, message", [({0: []}, "keep no attention head"), ({0: [4]}, "has heads 0..3")])
def test_impossible_head_lists_are_refused(keep, message):
    with pytest.raises(ConfigError, match=message):
        prune_heads(tiny_encoder(), keep)


def test_ffn_and_layer_limits_are_refused():
    with pytest.raises(ConfigError, match="keep no FFN neuron"):
        prune_ffn(tiny_encoder(), {0: []})
    with pytest.raises(ConfigError, match="would leave none"):
        layers_to_drop(4, 4, "top")
    with pytest.raises(ConfigError, match="out of range"):
        layers_to_drop(4, 0, "explicit", explicit=[4])


def test_layer_strategies_choose_the_documented_layers():
    assert layers_to_drop(6, 2, "top") == [4, 5]
    assert layers_to_drop(6, 2, "alternate") == [3, 5]
    assert layers_to_drop(6, 2, "importance", scores=torch.tensor([5.0, 1, 3, 0.5, 9, 7])) == [1, 3]
    assert layers_to_drop(6, 0, "explicit", explicit=[0, 2]) == [0, 2]
    with pytest.raises(ConfigError, match="strategy must be one of"):
        layers_to_drop(6, 1, "bottom")


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported for head pruning; supported: bert"):
        prune_heads(model, {0: [0]})
    with pytest.raises(ConfigError, match="'gpt2' is not supported for importance scoring"):
        score(model, "magnitude")
