"""Embedding compression: int8 rows within half a step of the original, low-rank factors at full rank reproduce
the logits, and both reload (also after a second save) with identical logits and a smaller file."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BertForSequenceClassification

from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.models import load_classifier
from prune.embeddings import compress_word_embedding, factorized_embedding, quantized_embedding
from prune.saving import save_compressed
from tests.conftest import tiny_bert_config, tiny_causal_lm

HIDDEN = 64


@pytest.fixture
def wide_bert(tokenizer):
    """The tiny classifier with a 64-wide embedding."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer), hidden_size=HIDDEN)).eval()


@pytest.fixture
def ids(tokenizer):
    return torch.randint(0, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_int8_rows_are_within_half_a_step_and_the_padding_row_stays_zero():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16, padding_idx=3)
    quantized = quantized_embedding(embedding)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.padding_idx == 3
    scale = embedding.weight.detach().abs().amax(dim=1) / 127
    assert torch.allclose(quantized.scale, torch.where(scale > 0, scale, 1.0))  # the zero padding row gets 1
    ids = torch.arange(50)
    error = (quantized(ids) - embedding(ids)).abs()
    assert (error <= quantized.scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(quantized(torch.tensor([3, 3])), torch.zeros(2, 16))
    assert quantized.weight_int8.abs().amax(dim=1).tolist()[:3] == [127, 127, 127]


def test_full_rank_factors_reproduce_the_embedding_and_the_logits(wide_bert, ids):
    embedding = wide_bert.get_input_embeddings()
    factors = factorized_embedding(embedding, 29)  # 29 rows of 64: full rank is 29
    assert (factors.embed.weight.shape, factors.project.weight.shape) == ((29, 29), (HIDDEN, 29))
    assert torch.allclose(factors(torch.arange(29)), embedding.weight, atol=1e-5)
    expected = logits(wide_bert, ids)
    assert compress_word_embedding(wide_bert, rank=29) == {"low_rank_embeddings": {"embeddings.word_embeddings": 29}}
    assert torch.allclose(logits(wide_bert, ids), expected, atol=1e-5)


def test_int8_classifier_reloads_identically_with_a_quarter_of_the_embedding_bytes(wide_bert, tokenizer, ids,
                                                                                    tmp_path):
    save_compressed(wide_bert, tokenizer, tmp_path / "plain")
    parameters = count_parameters(wide_bert)
    assert compress_word_embedding(wide_bert, int8=True) == {"int8_embeddings": ["embeddings.word_embeddings"]}
    assert count_parameters(wide_bert) == parameters  # the int8 matrix still counts; only its storage shrank
    save_compressed(wide_bert, tokenizer, tmp_path / "int8")
    saved = tmp_path / "int8" / "model.safetensors"
    with safe_open(saved, "pt") as weights:
        stored = weights.get_tensor("bert.embeddings.word_embeddings.weight_int8")
    assert stored.dtype == torch.int8 and stored.shape == (29, HIDDEN)
    saved_bytes = (tmp_path / "plain" / "model.safetensors").stat().st_size - saved.stat().st_size
    rows = 29
    assert abs(saved_bytes - (rows * HIDDEN * 3 - rows * 4)) < 200  # 4 bytes -> 1 per element, + a scale per row
    reloaded = load_classifier(str(tmp_path / "int8")).eval()
    assert torch.equal(logits(reloaded, ids), logits(wide_bert, ids))


@pytest.mark.parametrize("int8", [False, True])
def test_low_rank_embedding_reloads_identically_also_after_a_second_save(wide_bert, tokenizer, ids, tmp_path, int8):
    done = compress_word_embedding(wide_bert, int8=int8, rank=8)
    expected_spec = {"low_rank_embeddings": {"embeddings.word_embeddings": 8}}
    if int8:
        expected_spec["int8_embeddings"] = ["embeddings.word_embeddings.embed"]
    assert done == expected_spec
    expected = logits(wide_bert, ids)
    save_compressed(wide_bert, tokenizer, tmp_path / "first")
    assert json.loads((tmp_path / "first" / "config.json").read_text())["compression"] == expected_spec
    first = load_classifier(str(tmp_path / "first")).eval()
    assert torch.equal(logits(first, ids), expected)
    save_compressed(first, tokenizer, tmp_path / "second")  # modules of the checkpoint's own modeling code
    assert json.loads((tmp_path / "second" / "config.json").read_text())["compression"] == expected_spec
    assert torch.equal(logits(load_classifier(str(tmp_path / "second")).eval(), ids), expected)


def test_untied_causal_lm_keeps_a_float_output_layer_and_reloads(tokenizer, tmp_path):
    model = tiny_causal_lm(len(tokenizer), tied=False)
    compress_word_embedding(model, int8=True)
    assert model.lm_head.weight.dtype == torch.float32
    save_compressed(model, tokenizer, tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", trust_remote_code=True).eval()
    ids = torch.randint(0, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_tied_models_bad_ranks_and_compressed_embeddings_are_refused(wide_bert, tokenizer):
    with pytest.raises(ConfigError, match="LlamaForCausalLM ties its output layer to the word embedding"):
        compress_word_embedding(tiny_causal_lm(len(tokenizer), tied=True), int8=True)
    for rank in (0, 30, 2.5, True):
        with pytest.raises(ConfigError, match=f"embeddings.rank must be an integer from 1 to 29 .*; got {rank}"):
            compress_word_embedding(wide_bert, rank=rank)
    compress_word_embedding(wide_bert, int8=True)
    with pytest.raises(ConfigError, match="needs the word embedding as a plain nn.Embedding; got Int8Embedding"):
        compress_word_embedding(wide_bert, int8=True)
