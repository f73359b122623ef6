"""Pruning runs end to end on a tiny fine-tuned teacher: rounds of prune + distil-recover, saved outputs that
reload, resume after a kill, and targets that cannot be met refused before any work."""
import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, PreTrainedModel

from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from prune.config import ImportanceConfig, LayerDropConfig, LowRankConfig, PruneConfig, SparsityConfig, UnitPruneConfig
from prune.run import check_targets, prune
from prune.saving import layer_shapes
from tests.conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    Interrupt,
    assert_same_weights,
    logits_of,
    make_tokenizer,
    never_train,
)
from tests.helpers.pruning import prune_cfg, tiny_llama


def test_iterative_pruning_with_recovery_saves_a_smaller_model_that_reloads(trained_teacher, sentiment_csv, tmp_path):
    teacher_dir = trained_teacher.run_dir / "model"
    cfg = prune_cfg(sentiment_csv, teacher_dir, tmp_path / "pruned", rounds=2,
                    layers=LayerDropConfig(count=1, strategy="importance"),
                    sparsity=SparsityConfig(kind="unstructured", sparsity=0.3))
    result = prune(cfg)
    metrics = result.metrics
    assert sum(s["heads"] for s in metrics["shapes"]) == 6  # 3 layers of 4 heads, half removed
    assert sum(s["intermediate"] for s in metrics["shapes"]) == 3 * 48
    assert len(metrics["kept_layers"]) == 3
    assert metrics["sparsity"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert all(row["sparsity"] == pytest.approx(0.3, abs=0.01) for row in metrics["sparsity_per_linear"])
    assert metrics["parameters"] < metrics["unpruned"]["parameters"]
    assert metrics["test_accuracy"] >= 0.8  # the keyword task survives with recovery
    assert (tmp_path / "pruned" / "round-1" / "model" / "modeling_compressed.py").is_file()

    reloaded = load_classifier(str(result.run_dir / "model"))
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    texts = ["the film was good", "a dull and boring plot", "very lovely acting"]
    assert torch.equal(logits_of(reloaded, tokenizer, texts), logits_of(result.model, tokenizer, texts))
    assert layer_shapes(reloaded) == metrics["shapes"]
    rounds = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if "round" in r] == [1, 2]


def test_low_rank_and_two_four_sparsity_without_recovery(trained_teacher, sentiment_csv, tmp_path):
    cfg = prune_cfg(sentiment_csv, trained_teacher.run_dir / "model", tmp_path / "lr", recover=False,
                    heads=UnitPruneConfig(), ffn=UnitPruneConfig(), low_rank=LowRankConfig(rank_fraction=0.25, patterns=["intermediate"]),
                    sparsity=SparsityConfig(kind="n:m", n=2, m=4, patterns=["attention"]))
    result = prune(cfg)
    assert result.metrics["test_accuracy_before_recovery"] == result.metrics["test_accuracy"]
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert config["compression"]["low_rank"] == {f"encoder.layer.{i}.intermediate.dense": 8 for i in range(4)}
    reloaded = load_classifier(str(result.run_dir / "model"))
    query = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert (query.view(-1, 4) != 0).sum(-1).max() <= 2


@pytest.mark.parametrize("kill_after", [3, 9])  # in round 1's recovery, in round 2's
def test_killed_pruning_run_resumes_to_the_same_model(new_process, trained_teacher, sentiment_csv, tmp_path,
                                                     kill_after):
    teacher_dir = trained_teacher.run_dir / "model"
    full = prune(prune_cfg(sentiment_csv, teacher_dir, tmp_path / "full", rounds=2)).model
    new_process()
    calls = []

    def kill(state):
        calls.append(state.global_step)
        if len(calls) == kill_after:
            raise Interrupt

    cfg = prune_cfg(sentiment_csv, teacher_dir, tmp_path / "resumed", rounds=2)
    with pytest.raises(Interrupt):
        prune(cfg, on_step=kill)
    new_process()
    resumed = prune(cfg).model
    assert_same_weights(full, resumed)


def test_bad_pruning_configs_fail_before_any_work(trained_teacher, sentiment_csv, tmp_path):
    teacher_dir = trained_teacher.run_dir / "model"
    cases = {
        "nothing to prune": dict(heads=UnitPruneConfig(), ffn=UnitPruneConfig()),
        "unknown importance criterion 'taylr'": dict(importance=ImportanceConfig(criterion="taylr")),
        "cannot remove 17 of 16": dict(heads=UnitPruneConfig(count=17)),
        "would leave none": dict(layers=LayerDropConfig(count=4, strategy="top")),
        "sparsity.kind must be one of": dict(sparsity=SparsityConfig(kind="2:4")),
        "heads.scope must be one of": dict(heads=UnitPruneConfig(fraction=0.5, scope="all")),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            prune(prune_cfg(sentiment_csv, teacher_dir, tmp_path / "bad", **overrides), on_step=never_train)


def test_an_unsupported_family_is_refused_from_its_config_before_any_weights_load(sentiment_csv, tmp_path,
                                                                                monkeypatch):
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, num_labels=2, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the family check")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    with pytest.raises(ConfigError, match="^architecture 'gpt2' is not supported for pruning; supported: bert, "):
        prune(prune_cfg(sentiment_csv, tmp_path / "gpt2", tmp_path / "run"), on_step=never_train)
    assert not (tmp_path / "run").exists()


def test_head_counts_must_be_whole_key_value_groups():
    model = tiny_llama()  # 4 query heads in 2 groups per layer, 3 layers
    cfg = PruneConfig(heads=UnitPruneConfig(count=3))
    with pytest.raises(ConfigError, match="heads.count=3 is not a whole number of key/value groups of 2"):
        check_targets(cfg, model, layer_shapes(model))
    check_targets(PruneConfig(heads=UnitPruneConfig(count=2)), model, layer_shapes(model))
    with pytest.raises(ConfigError, match="cannot remove 4 of 6"):
        check_targets(PruneConfig(heads=UnitPruneConfig(count=8)), model, layer_shapes(model))
