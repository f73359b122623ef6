"""The pieces of `distill.core.sharding` that need no process group: which modules become units (the repeated
layers a model names in `_no_split_modules`), the refusal of a model without them, and the bytes a process holds of
weights, gradients and optimizer state. Sharded runs themselves are tested in test_sharding.py."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from distill.core.sharding import layer_units, local_bytes, shard_model, state_bytes
from tests.conftest import tiny_bert_config, tiny_causal_lm


def test_units_are_the_repeated_layers_the_model_names():
    llama = tiny_causal_lm(40, tied=True)
    assert layer_units(llama) == list(llama.model.layers) and len(llama.model.layers) == 2
    bert = AutoModelForSequenceClassification.from_config(tiny_bert_config(40))
    assert layer_units(bert) == list(bert.bert.encoder.layer)  # BertEmbeddings is named too, but in no ModuleList


def test_a_model_without_named_layers_is_refused_before_anything_is_sharded():
    electra = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "electra", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    assert layer_units(electra) == []  # Electra lists no _no_split_modules
    with pytest.raises(ValueError, match="ElectraForSequenceClassification lists no repeated layer class"):
        shard_model(electra)


def test_local_bytes_count_every_tensor_at_its_own_element_size():
    tensors = [torch.zeros(3, 4), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.int8)]
    assert local_bytes(tensors) == 3 * 4 * 4 + 10 * 2 + 5


def test_state_bytes_count_trained_weights_their_gradients_and_adams_two_moments():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    model[1].requires_grad_(False)  # frozen: not trained, so neither counted nor in the optimizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    trained = (8 * 4 + 4) * 4
    # Adam's step counters are 0-dimensional: not state that grows with the model
    assert state_bytes(model, optimizer) == {"weights": trained, "gradients": trained, "optimizer": 2 * trained}
