"""Low-rank factorization by truncated SVD: rank rules, the parameter-saving skip, reload with identical logits."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from prune.lowrank import energy_rank, factorize, factorized_linear
from prune.remote_modeling import set_submodule
from prune.saving import save_compressed
from prune.sparsity import apply_masks, magnitude_masks
from tests.conftest import tiny_bert_config

FFN_PATHS = [f"encoder.layer.{i}.{name}" for i in range(4) for name in ("intermediate.dense", "output.dense")]


@pytest.fixture
def ids(tokenizer):
    torch.manual_seed(1)
    return torch.randint(5, len(tokenizer), (2, 9))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_linear_paths(model) -> list[str]:
    return [f"encoder.layer.{name}" for name, module in model.bert.encoder.layer.named_modules()
            if isinstance(module, nn.Linear)]


def matrix_with_singular_values(values: list[float], rows: int) -> torch.Tensor:
    torch.manual_seed(2)
    left, _ = torch.linalg.qr(torch.randn(rows, len(values)))
    right, _ = torch.linalg.qr(torch.randn(len(values), len(values)))
    return left @ torch.diag(torch.tensor(values)) @ right.T


def test_full_rank_factors_reproduce_the_logits(bert, ids):
    expected = bert(input_ids=ids).logits
    for path in layer_linear_paths(bert):
        linear = bert.base_model.get_submodule(path)
        set_submodule(bert.base_model, path, factorized_linear(linear, min(linear.weight.shape)))
    assert isinstance(bert.bert.encoder.layer[0].attention.self.query, nn.Sequential)
    assert torch.allclose(bert(input_ids=ids).logits, expected, atol=1e-5)


def test_factors_hold_the_truncated_svd_and_the_bias():
    linear = nn.Linear(32, 64)
    pair = factorized_linear(linear, 5)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    assert (pair[0].weight.shape, pair[1].weight.shape) == ((5, 32), (64, 5))
    assert pair[0].bias is None and torch.equal(pair[1].bias, linear.bias)
    assert torch.allclose(pair[1].weight @ pair[0].weight, best, atol=1e-6)
    assert torch.allclose(pair[0].weight.norm(dim=1), pair[1].weight.norm(dim=0), atol=1e-6)  # sqrt(S) each side


def test_a_masked_linear_is_factorized_with_its_mask_folded_in(bert):
    linear = bert.bert.encoder.layer[1].intermediate.dense
    apply_masks(bert, magnitude_masks(bert, 0.5, patterns=[r"layer\.1\.intermediate"]))
    with torch.no_grad():
        linear.weight_orig.add_(0.01)  # as an optimizer step would: `linear.weight` is stale until a forward
    pair = factorized_linear(linear, 32)
    assert torch.allclose(pair[1].weight @ pair[0].weight, linear.weight_orig * linear.weight_mask, atol=1e-6)


def test_factors_keep_the_weight_dtype():
    pair = factorized_linear(nn.Linear(32, 64, dtype=torch.bfloat16), 4)
    assert pair[0].weight.dtype == pair[1].weight.dtype == pair[1].bias.dtype == torch.bfloat16


def test_energy_picks_the_smallest_rank_keeping_that_fraction():
    weight = matrix_with_singular_values([4.0, 2.0, 1.0, 1.0], rows=6)  # squares 16, 4, 1, 1 of 22
    assert energy_rank(weight, 16 / 22 - 1e-6) == 1
    assert energy_rank(weight, 0.75) == 2
    assert energy_rank(weight, 21 / 22 + 1e-6) == 4
    assert energy_rank(weight, 1.0) == 4
    assert energy_rank(torch.randn(64, 32), 1.0) == 32


def test_energy_one_is_full_rank_so_nothing_is_factorized(bert, ids):
    expected = bert(input_ids=ids).logits
    assert factorize(bert, energy=1.0) == {}
    assert torch.equal(bert(input_ids=ids).logits, expected)


def test_linears_whose_rank_saves_no_parameters_are_skipped(bert):
    # attention 32x32 saves only below rank 16; FFN 32x64 only below 2048 / 96 = 21.3
    assert factorize(bert, rank=16) == {path: 16 for path in FFN_PATHS}
    assert isinstance(bert.bert.encoder.layer[0].attention.self.query, nn.Linear)
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(tiny_bert_config(bert.config.vocab_size))
    assert factorize(fresh, rank=21) == {path: 21 for path in FFN_PATHS}
    assert factorize(fresh, rank=22, patterns=["attention"]) == {}
    assert factorize(fresh, rank=999, patterns=["attention"]) == {}


def test_rank_halved_bert_is_smaller_and_reloads_with_identical_logits(bert, tokenizer, ids, tmp_path):
    before = parameter_count(bert)
    ranks = factorize(bert, rank_fraction=0.5)
    assert ranks == {path: 16 for path in FFN_PATHS}  # attention at rank 16 would save nothing
    assert parameter_count(bert) == before - len(FFN_PATHS) * (32 * 64 - 16 * (32 + 64))
    save_compressed(bert, tokenizer, tmp_path / "low_rank")
    assert json.loads((tmp_path / "low_rank" / "config.json").read_text())["compression"]["low_rank"] == ranks
    reloaded = load_classifier(str(tmp_path / "low_rank")).eval()
    assert parameter_count(reloaded) == parameter_count(bert)
    assert torch.equal(reloaded(input_ids=ids).logits, bert(input_ids=ids).logits)


def test_rank_halved_llama_reloads_with_identical_logits(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48)
    llama = LlamaForCausalLM(config).eval()
    ranks = factorize(llama, rank_fraction=0.5)
    # q and o (32x32) save nothing at rank 16; k and v (32 -> 16) go to rank 8, the MLP (32 <-> 48) to 16
    assert ranks == {f"layers.{i}.{name}": rank for i in range(2) for name, rank in
                     [("self_attn.k_proj", 8), ("self_attn.v_proj", 8), ("mlp.gate_proj", 16),
                      ("mlp.up_proj", 16), ("mlp.down_proj", 16)]}
    save_compressed(llama, tokenizer, tmp_path / "low_rank")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "low_rank", trust_remote_code=True).eval()
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(reloaded(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_patterns_choose_linears_and_factorized_halves_are_left_alone(bert):
    first, paths = "encoder.layer.0.intermediate.dense", layer_linear_paths(bert)
    assert factorize(bert, rank=4, patterns=[rf"^{first}$"]) == {first: 4}
    rest = factorize(bert, rank=4)
    assert sorted(rest) == sorted(p for p in paths if p != first)
    with pytest.raises(ConfigError, match="no Linear in the layers is left to factorize"):
        factorize(bert, rank=4)


def test_bad_settings_are_clear_errors(bert):
    with pytest.raises(ConfigError, match="give exactly one of rank, rank_fraction, energy; got none"):
        factorize(bert)
    with pytest.raises(ConfigError, match="give exactly one of rank, rank_fraction, energy; got rank, energy"):
        factorize(bert, rank=4, energy=0.9)
    for rank in (0, 2.5, True):
        with pytest.raises(ConfigError, match=f"rank must be a positive integer; got {rank}"):
            factorize(bert, rank=rank)
    for fraction in (0, 1.5):
        with pytest.raises(ConfigError, match=rf"rank_fraction must be in \(0, 1\]; got {fraction}"):
            factorize(bert, rank_fraction=fraction)
    for energy in (0.0, 1.01):
        with pytest.raises(ConfigError, match=rf"energy must be in \(0, 1\]; got {energy}"):
            factorize(bert, energy=energy)
    with pytest.raises(ConfigError, match=r"patterns \['mlp'\] match no Linear in the layers"):
        factorize(bert, rank=4, patterns=["mlp"])
    assert all(isinstance(bert.base_model.get_submodule(p), nn.Linear) for p in layer_linear_paths(bert))
