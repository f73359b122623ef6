"""Importance criteria and unit selection: each criterion ranks a planted unimportant unit last."""
import pytest
import torch
from transformers import BertForSequenceClassification

from distill.core.errors import ConfigError
from prune.importance import CRITERIA, score
from prune.selection import select_kept, units_to_remove
from tests.conftest import make_tokenizer, tiny_bert_config
from tests.helpers.pruning import tiny_llama

TOKENIZER = make_tokenizer(["good", "bad", "film", "plot"])


def classifier_batches(n=3):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, len(TOKENIZER), (8, 10), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 2, (8,), generator=generator)})
    return batches


def planted_bert():
    """Layer 1 head 2 and layer 2 FFN neuron 5 contribute nothing and have tiny input weights."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(TOKENIZER)))
    with torch.no_grad():
        attention = model.bert.encoder.layer[1].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight[16:24] *= 0.01
        attention.output.dense.weight[:, 16:24] = 0
        layer = model.bert.encoder.layer[2]
        layer.intermediate.dense.weight[5] *= 0.01
        layer.output.dense.weight[:, 5] = 0
    return model


@pytest.mark.parametrize("name", ["magnitude", "taylor", "fisher"])
def test_criteria_rank_planted_head_and_neuron_last(name):
    scores = score(planted_bert(), name, classifier_batches())
    assert scores.heads[1].argmin().item() == 2
    assert scores.neurons[2].argmin().item() == 5
    assert all(torch.isfinite(s).all() for s in scores.heads + scores.neurons)


@pytest.mark.parametrize("name", ["taylor", "fisher"])
def test_gradient_criteria_find_a_layer_that_does_nothing(name):
    model = tiny_llama()  # pre-norm: zero output projections make a layer the identity
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    scores = score(model, name, [{"input_ids": ids, "labels": ids}])
    assert scores.layers.argmin().item() == 1 and scores.layers[1] == 0
    assert [len(h) for h in scores.heads] == [4, 4, 4]


def test_gradient_criteria_leave_the_model_as_they_found_it():
    model = planted_bert().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score(model, "taylor", classifier_batches(1))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not model.bert.encoder.layer[0].attention.output.dense._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_random_criterion_is_seeded():
    model = planted_bert()
    assert torch.equal(score(model, "random", seed=3).heads[0], score(model, "random", seed=3).heads[0])
    assert not torch.equal(score(model, "random", seed=3).heads[0], score(model, "random", seed=4).heads[0])


def test_unknown_criterion_and_missing_batches_are_named():
    with pytest.raises(ConfigError, match="unknown importance criterion 'hessian'.*magnitude"):
        score(planted_bert(), "hessian")
    with pytest.raises(ConfigError, match="need calibration batches"):
        score(planted_bert(), "taylor", [])
    assert set(CRITERIA) == {"magnitude", "taylor", "fisher", "random", "activation", "activation_squared"}


def test_global_selection_normalises_per_layer_and_keeps_one_per_layer():
    scores = [torch.tensor([100.0, 90.0, 1.0]), torch.tensor([1.0, 0.9, 0.8])]
    assert select_kept(scores, 2, "global") == [[0, 1], [0, 1]]  # normalised, the two smallest shares go
    assert select_kept(scores, 4, "global") == [[0], [0]]
    assert select_kept(scores, 2, "layer") == [[0, 1], [0, 1]]
    assert select_kept([torch.tensor([3.0, 1, 2, 0]), torch.tensor([1.0, 2])], 3, "layer") == [[0, 2], [1]]


def test_impossible_unit_targets_are_refused():
    assert units_to_remove([4, 4], 0.5, None, "heads") == 4
    with pytest.raises(ConfigError, match="at most 6 can go"):
        units_to_remove([4, 4], None, 7, "heads")
    with pytest.raises(ConfigError, match=r"heads.fraction must be in \[0, 1\)"):
        units_to_remove([4, 4], 1.0, None, "heads")
    with pytest.raises(ConfigError, match="exactly one of fraction and count"):
        units_to_remove([4, 4], 0.5, 2, "heads")
