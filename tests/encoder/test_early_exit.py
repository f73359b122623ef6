"""Early exit: the self-distillation loss, exit heads trained in a run and saved with the model, and inference
that lets each example leave at its first confident exit."""
import json
import math
import re
from pathlib import Path

import early_exit_eval
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.config import LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.data import collator, load_splits, tokenize
from distill.core.errors import ConfigError
from distill.core.io import save_model
from distill.core.loss_interface import LossInputs, LossSetup, build_losses, check_stages
from distill.core.trainer import Objective, param_groups
from distill.encoder.config import DistillConfig, FinetuneConfig
from distill.encoder.early_exit import EarlyExitClassifier, ExitHeads, evaluate_thresholds
from distill.encoder.finetune import finetune
from distill.encoder.job import distill
from distill.losses.response import soft_kl
from tests.conftest import data_cfg, make_sentences, never_train, tiny_bert_config, train_cfg

ROOT = Path(__file__).resolve().parents[2]


def batch_of(tokenizer, n=12):
    return dict(tokenizer([text for text, _ in make_sentences(n, seed=1)], padding=True, return_tensors="pt"))


def classifier_with_random_heads(model, layers, pooling="cls"):
    torch.manual_seed(1)
    return EarlyExitClassifier(model, ExitHeads(layers, pooling, model.config.hidden_size, model.config.num_labels))


def tiny_roberta(vocab_size):
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=70, pad_token_id=0, num_labels=2)
    return RobertaForSequenceClassification(config).eval()


def test_exit_loss_matches_hand_computation_and_leaves_the_final_logits_alone():
    setup = LossSetup(tiny_bert_config(20, hidden_size=2, num_attention_heads=1, num_hidden_layers=2), None, None)
    spec = LossConfig(name="early_exit", temperature=2.0, exit_label_mix=0.25)
    loss = build_losses([spec], setup)["early_exit"]
    head = loss.heads.heads[0]
    with torch.no_grad():
        head[0].weight.copy_(torch.eye(2))
        head[2].weight.copy_(2 * torch.eye(2))
        head[0].bias.zero_()
        head[2].bias.zero_()
    layer_1 = torch.tensor([[[0.5, -0.5], [9.0, 9.0]]])  # [CLS] first; the other token is not read
    final = torch.tensor([[0.0, 1.0]], requires_grad=True)
    outputs = SequenceClassifierOutput(logits=final, hidden_states=(torch.zeros(1, 2, 2), layer_1, layer_1))
    value = loss(LossInputs(outputs, None, torch.tensor([1]), torch.ones(1, 2)))

    a = 2 * math.tanh(0.5)  # exit logits: [a, -a]
    p = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]  # final / T
    q = [1 / (1 + math.exp(-a)), math.exp(-a) / (1 + math.exp(-a))]  # exit / T
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = math.log(1 + math.exp(2 * a))  # -log softmax([a, -a])[1]
    assert value.item() == pytest.approx(0.75 * kl * 4 + 0.25 * ce, rel=1e-5)
    value.backward()
    assert final.grad is None and head[2].weight.grad is not None


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_threshold_one_is_the_full_model_and_zero_the_first_exit(family, bert, tokenizer):
    model = bert if family == "bert" else tiny_roberta(len(tokenizer))
    layers = model.config.num_hidden_layers
    classifier = classifier_with_random_heads(model, [1, layers - 1])
    batch = batch_of(tokenizer)
    full = model(**batch).logits

    out = classifier(**batch, threshold=1.0)
    assert torch.equal(out.logits, full) and torch.equal(out.logits.argmax(-1), full.argmax(-1))
    assert out.exit_layers.tolist() == [layers] * len(full)

    out = classifier(**batch, threshold=0.0)
    assert out.exit_layers.tolist() == [1] * len(full)
    assert torch.allclose(out.logits, classifier.exit_logits(**batch)[0], atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_exit_heads_start_as_copies_of_the_models_own_head(family, bert, tokenizer):
    model = bert if family == "bert" else tiny_roberta(len(tokenizer))
    layers = model.config.num_hidden_layers
    loss = build_losses([LossConfig(name="early_exit", exit_layers=[1])], LossSetup(model.config, None, None))
    loss["early_exit"].attach(model)
    batch = batch_of(tokenizer)
    outputs = model(**batch, output_hidden_states=True)
    last_layer_through_exit_head = loss["early_exit"].heads.logits_at(1, outputs.hidden_states[layers],
                                                                      batch["attention_mask"])
    assert torch.allclose(last_layer_through_exit_head, outputs.logits, atol=1e-6)


def test_a_loss_learning_rate_puts_its_own_parameters_in_groups_of_their_own(bert):
    losses = build_losses([LossConfig(name="early_exit", exit_layers=[1], learning_rate=0.01)],
                          LossSetup(bert.config, None, None))
    groups = param_groups(Objective(bert, losses), train_cfg().weight_decay)
    heads = {id(p) for p in losses.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= heads if group.get("lr") == 0.01 else not ids & heads
    assert sum(len(g["params"]) for g in groups if g.get("lr") == 0.01) == len(heads)
    with pytest.raises(ConfigError, match="learning_rate must be positive"):
        check_stages([StageConfig(losses=[LossConfig(name="early_exit", learning_rate=0.0)])])


def test_each_example_leaves_at_its_first_confident_exit(bert, tokenizer):
    classifier = classifier_with_random_heads(bert, [1, 2, 3], pooling="mean")
    batch = batch_of(tokenizer)
    exits = classifier.exit_logits(**batch)
    confidence = torch.stack([e.softmax(-1).max(-1).values for e in exits])  # (exits, batch)
    threshold = confidence[0].median().item()  # about half leave at the first exit, the rest run on
    out = classifier(**batch, threshold=threshold)

    first = [next((i for i in range(3) if confidence[i, b] >= threshold), 3) for b in range(len(exits[0]))]
    assert out.exit_layers.tolist() == [i + 1 for i in first]
    assert 1 in out.exit_layers.tolist() and set(out.exit_layers.tolist()) != {1}
    expected = torch.stack([exits[i][b] for b, i in enumerate(first)])
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_saved_heads_reload_with_the_model_and_give_identical_exits(bert, tokenizer, tmp_path):
    classifier = classifier_with_random_heads(bert, [1, 3], pooling="mean")
    save_model(bert, tokenizer, tmp_path / "model", extra_files=classifier.heads.to_files())
    assert json.loads((tmp_path / "model" / "early_exit.json").read_text()) == {
        "layers": [1, 3], "pooling": "mean", "hidden_size": 32, "num_labels": 2}

    reloaded = EarlyExitClassifier.from_pretrained(tmp_path / "model")
    batch = batch_of(tokenizer)
    for before, after in zip(classifier.exit_logits(**batch), reloaded.exit_logits(**batch)):
        assert torch.equal(before, after)
    threshold = classifier.exit_logits(**batch)[0].softmax(-1).max(-1).values.median().item()
    assert torch.equal(classifier(**batch, threshold=threshold).logits, reloaded(**batch, threshold=threshold).logits)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()  # extra files ignored
    assert torch.equal(plain(**batch).logits, bert(**batch).logits)


def early_exit_finetune(csv, model_dir, out, **loss):
    losses = [LossConfig(name="ce"), LossConfig(name="early_exit", temperature=2.0, **loss)]
    return FinetuneConfig(model=str(model_dir), output_dir=str(out), data=data_cfg(csv),
                          stage=StageConfig(epochs=10, learning_rate=3e-3, losses=losses), train=train_cfg())


def test_fine_tuning_trains_heads_that_agree_with_the_final_layer(sentiment_csv, tiny_teacher_dir, tokenizer,
                                                                  tmp_path):
    cfg = early_exit_finetune(sentiment_csv, tiny_teacher_dir, tmp_path / "run")
    result = finetune(cfg)
    model_dir = tmp_path / "run" / "model"
    assert {"early_exit.json", "early_exit.safetensors"} <= {p.name for p in model_dir.iterdir()}
    trained = EarlyExitClassifier.from_pretrained(model_dir)
    assert trained.heads.layers == [1, 2, 3]
    untrained = classifier_with_random_heads(trained.model, [1, 2, 3])

    test = tokenize(load_splits(cfg.data), tokenizer, cfg.data.max_length)["test"]
    loader = DataLoader(test, 64, collate_fn=collator(tokenizer))
    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}

    def agreement(classifier):
        *heads, final = classifier.exit_logits(**batch)
        return [(logits.argmax(-1) == final.argmax(-1)).float().mean().item() for logits in heads]

    def distance(classifier):
        *heads, final = classifier.exit_logits(**batch)
        return sum(soft_kl(logits, final, 2.0).item() for logits in heads)

    assert agreement(trained)[1:] == [1.0, 1.0]  # one layer of a tiny model is too shallow to match it fully
    assert sum(agreement(trained)) > sum(agreement(untrained)) + 0.5
    assert distance(trained) < 0.75 * distance(untrained)

    full, first = evaluate_thresholds(trained, loader, [1.0, 0.0])
    assert full["accuracy"] == result.metrics["test_accuracy"] and full["average_layers"] == 4.0
    assert full["exits"] == {4: len(test)}
    assert first["average_layers"] == 1.0 and first["compute_fraction"] == 0.25


def test_eval_script_prints_accuracy_against_layers_used(sentiment_csv, tiny_teacher_dir, tmp_path, capsys):
    cfg = early_exit_finetune(sentiment_csv, tiny_teacher_dir, tmp_path / "run", exit_layers=[2])
    cfg.stage.epochs = 1
    finetune(cfg)
    early_exit_eval.main([str(tmp_path / "run" / "model"), "--thresholds", "0", "1",
                          "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| threshold | test acc. | avg. layers (of 4) | compute |")
    assert table[2].startswith("| 0 |") and "| 2.00 | 50% | 2: 41 |" in table[2]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["average_layers"] for row in rows] == [2.0, 4.0]


def test_exit_heads_train_next_to_distillation_losses(tiny_teacher_dir, sentiment_csv, tmp_path):
    recipe = parse_args(DistillConfig, ["--config", str(ROOT / "recipes" / "distill_early_exit.yaml")])
    check_stages(recipe.stages)
    losses = recipe.stages[0].losses
    losses[-1].exit_layers = [1]  # the tiny student has 2 layers
    cfg = DistillConfig(teacher=str(tiny_teacher_dir), output_dir=str(tmp_path / "student"),
                        data=data_cfg(sentiment_csv), student=StudentConfig(layers=[1, 3]),
                        stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=losses)], train=train_cfg())
    distill(cfg)
    heads = ExitHeads.from_folder(tmp_path / "student" / "model")
    assert heads.layers == [1] and heads.pooling == "cls"
    logged = (tmp_path / "student" / "metrics.jsonl").read_text()
    assert "train_kl" in logged and "train_early_exit" in logged


def test_config_errors_name_the_problem(sentiment_csv, tiny_teacher_dir, tmp_path):
    setup = LossSetup(tiny_bert_config(20), None, None)  # 4 layers
    for layers in ([0], [4], [1, 5]):
        message = f"exit_layers {[k for k in layers if not 1 <= k < 4]} out of range: exits go after layers 1..3 of 4"
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_losses([LossConfig(name="early_exit", exit_layers=layers)], setup)
    with pytest.raises(ConfigError, match="a 1-layer model has no layer before the last"):
        build_losses([LossConfig(name="early_exit")], LossSetup(tiny_bert_config(20, num_hidden_layers=1), None, None))
    llama = LlamaConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match="'llama' is not supported"):
        build_losses([LossConfig(name="early_exit")], LossSetup(llama, None, None))

    spec_errors = {"pooling must be one of cls, mean; got 'max'": dict(pooling="max"),
                   r"exit_label_mix is a share, in 0..1; got 1.5": dict(exit_label_mix=1.5),
                   r"exit_layers \[1, 1\] repeats a layer": dict(exit_layers=[1, 1])}
    for message, fields in spec_errors.items():
        with pytest.raises(ConfigError, match=r"stages\[0\]: loss 'early_exit': " + message):
            check_stages([StageConfig(losses=[LossConfig(name="early_exit", **fields)])])

    cfg = early_exit_finetune(sentiment_csv, tiny_teacher_dir, tmp_path / "run", exit_layers=[4])
    with pytest.raises(ConfigError, match=r"exit_layers \[4\] out of range"):
        finetune(cfg, on_step=never_train)
    with pytest.raises(ConfigError, match="has no early-exit heads"):
        EarlyExitClassifier.from_pretrained(tiny_teacher_dir)
