"""Unstructured and N:M sparsity: exact mask patterns, masks that stay fixed while training, reload."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from prune.saving import save_compressed
from prune.sparsity import apply_masks, magnitude_masks, make_permanent, nm_masks, sparsity_report

LINEARS_PER_BERT_LAYER = 6  # query, key, value, attention output, intermediate, output


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48)
    return LlamaForCausalLM(config).eval()


def weights_of(model, masks):
    return {path: model.get_submodule(path).weight.detach() for path in masks}


def test_layer_masks_prune_exactly_the_smallest_weights_of_each_linear(bert):
    masks = magnitude_masks(bert, 0.3)
    assert len(masks) == 4 * LINEARS_PER_BERT_LAYER
    assert all(path.startswith("bert.encoder.layer.") for path in masks)  # no embeddings, pooler or classifier
    for path, weight in weights_of(bert, masks).items():
        mask = masks[path]
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((~mask).sum()) == round(0.3 * weight.numel()), path
        assert weight[~mask].abs().max() <= weight[mask].abs().min(), path


def test_global_masks_use_one_threshold_across_linears(bert):
    query = bert.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.weight.mul_(10)  # far larger than the rest: a global threshold spares it
    masks = magnitude_masks(bert, 0.5, scope="global")
    weights = weights_of(bert, masks)
    pruned = torch.cat([weights[p][~m] for p, m in masks.items()]).abs()
    kept = torch.cat([weights[p][m] for p, m in masks.items()]).abs()
    assert len(pruned) == round(0.5 * (len(pruned) + len(kept)))
    assert pruned.max() <= kept.min()
    sparsity = {path: (~mask).float().mean() for path, mask in masks.items()}
    assert sparsity.pop("bert.encoder.layer.0.attention.self.query") < 0.1 < min(sparsity.values())


def test_patterns_choose_the_linears(bert):
    masks = magnitude_masks(bert, 0.5, patterns=[r"intermediate\.dense$", r"layer\.3\.output\.dense"])
    assert sorted(masks) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(4)] + [
        "bert.encoder.layer.3.output.dense"]


def test_sparsity_zero_keeps_everything(bert):
    assert all(mask.all() for mask in magnitude_masks(bert, 0.0).values())


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_keep_the_n_largest_of_every_m_inputs(llama, n, m):
    masks = nm_masks(llama, n, m)
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for path, weight in weights_of(llama, masks).items():
        groups, keep = weight.abs().reshape(weight.shape[0], -1, m), masks[path].reshape(weight.shape[0], -1, m)
        assert (keep.sum(-1) == n).all(), path
        smallest_kept = groups.masked_fill(~keep, float("inf")).amin(-1)
        largest_pruned = groups.masked_fill(keep, -1.0).amax(-1)
        assert (largest_pruned <= smallest_kept).all(), path


def train_a_few_steps(model, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        ids = torch.randint(5, model.config.vocab_size, (4, 8))
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_masks_stay_fixed_during_training_and_become_plain_weights(bert):
    stock_keys = set(bert.state_dict())
    masks = magnitude_masks(bert, 0.5)
    before = {path: weight.clone() for path, weight in weights_of(bert, masks).items()}
    apply_masks(bert, masks)
    train_a_few_steps(bert)
    make_permanent(bert)
    assert set(bert.state_dict()) == stock_keys
    for path, weight in weights_of(bert, masks).items():
        assert isinstance(bert.get_submodule(path).weight, torch.nn.Parameter)
        assert (weight[~masks[path]] == 0).all(), path
        assert not torch.equal(weight[masks[path]], before[path][masks[path]]), path  # training did happen
    assert sparsity_report(bert)[-1]["sparsity"] == 0.5


def test_report_counts_zeros_with_masks_applied_and_after_make_permanent(bert):
    dense = sparsity_report(bert)
    assert dense[-1] == {"path": "all layers", "weights": sum(r["weights"] for r in dense[:-1]), "zeros": 0,
                         "sparsity": 0.0}
    apply_masks(bert, magnitude_masks(bert, 0.25, patterns=["intermediate"]))
    applied = sparsity_report(bert)
    make_permanent(bert)
    assert sparsity_report(bert) == applied
    rows = {row["path"]: row for row in applied}
    ffn_in = rows["bert.encoder.layer.2.intermediate.dense"]
    assert (ffn_in["weights"], ffn_in["zeros"], ffn_in["sparsity"]) == (32 * 64, 512, 0.25)
    assert rows["bert.encoder.layer.2.output.dense"]["zeros"] == 0
    assert rows["all layers"]["zeros"] == 4 * 512


def test_sparse_bert_reloads_with_identical_logits(bert, tokenizer, tmp_path):
    apply_masks(bert, magnitude_masks(bert, 0.6, scope="global"))
    make_permanent(bert)
    save_compressed(bert, tokenizer, tmp_path / "sparse")
    reloaded = load_classifier(str(tmp_path / "sparse")).eval()
    ids = torch.randint(5, len(tokenizer), (2, 9))
    assert torch.equal(reloaded(input_ids=ids).logits, bert(input_ids=ids).logits)
    assert sparsity_report(reloaded) == sparsity_report(bert)


def test_two_four_llama_reloads_with_identical_logits(llama, tokenizer, tmp_path):
    apply_masks(llama, nm_masks(llama))
    make_permanent(llama)
    save_compressed(llama, tokenizer, tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse", trust_remote_code=True).eval()
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(reloaded(input_ids=ids).logits, llama(input_ids=ids).logits)
    assert sparsity_report(reloaded)[-1]["sparsity"] == 0.5


def test_bad_settings_are_clear_errors(bert):
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\); got 1.0"):
        magnitude_masks(bert, 1.0)
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\); got -0.1"):
        magnitude_masks(bert, -0.1)
    with pytest.raises(ConfigError, match="scope must be one of layer, global; got 'row'"):
        magnitude_masks(bert, 0.5, scope="row")
    with pytest.raises(ConfigError, match=r"patterns \['attn'\] match no Linear in the layers; paths look like"):
        magnitude_masks(bert, 0.5, patterns=["query", "attn"])
    with pytest.raises(ConfigError, match="'query\\(' is not a valid regular expression"):
        nm_masks(bert, patterns=["query("])
    with pytest.raises(ConfigError, match="N:M sparsity needs 1 <= n < m; got 4:4"):
        nm_masks(bert, 4, 4)
    with pytest.raises(ConfigError, match="N:M sparsity needs 1 <= n < m; got 0:4"):
        nm_masks(bert, 0, 4)
    with pytest.raises(ConfigError, match="2:5 sparsity needs in_features divisible by 5; these are not: .*query"):
        nm_masks(bert, 2, 5)
