"""End-to-end runs on tiny models and synthetic data: fine-tune, distil, save/reload, resume, bad inputs."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

from distill.core.config import DataConfig, LayerMapConfig, LossConfig, StageConfig, StudentConfig
from distill.core.errors import ConfigError
from distill.core.run import load_task
from distill.core.trainer import RankTrace, planned_batches, train_sampler
from distill.encoder.config import DistillConfig, FinetuneConfig
from distill.encoder.finetune import finetune
from distill.encoder.job import distill
from tests.conftest import (
    Interrupt,
    assert_same_weights,
    data_cfg,
    logits_of,
    make_tokenizer,
    never_train,
    tiny_bert_config,
    train_cfg,
)

TINYBERT_LOSSES = [LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5),
                   LossConfig(name="hidden_mse"), LossConfig(name="attention_mse")]


def distill_cfg(csv, teacher, out, **overrides):
    values = dict(teacher=str(teacher), output_dir=str(out), data=data_cfg(csv),
                  student=StudentConfig(layers=[1, 3]),
                  stages=[StageConfig(epochs=2, learning_rate=1e-3, losses=TINYBERT_LOSSES)], train=train_cfg())
    values.update(overrides)
    return DistillConfig(**values)


def test_finetune_then_distill_saves_reloadable_models(trained_teacher, sentiment_csv, tmp_path):
    assert trained_teacher.metrics["test_accuracy"] >= 0.9  # the keyword task is easy once trained
    teacher_dir = trained_teacher.run_dir / "model"
    result = distill(distill_cfg(sentiment_csv, teacher_dir, tmp_path / "student"))
    run_dir = result.run_dir
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json", "model"}
    assert (run_dir / "model" / "model.safetensors").is_file()

    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert reloaded.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    texts = ["the film was good", "a dull and boring plot", "very lovely acting"]
    assert torch.equal(logits_of(reloaded, tokenizer, texts), logits_of(result.model, tokenizer, texts))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["parameters"] < trained_teacher.metrics["parameters"]
    assert metrics["test_accuracy"] >= 0.8
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if "validation_accuracy" in line] == [0, 1]
    assert {"train_kl", "train_ce", "train_hidden_mse", "train_attention_mse"} <= set(lines[2])


def test_two_stage_tinybert_runs_intermediate_then_prediction_stage(trained_teacher, sentiment_csv, tmp_path):
    stages = [StageConfig(name="intermediate", epochs=1, learning_rate=1e-3,
                          losses=[LossConfig(name="hidden_mse"), LossConfig(name="attention_kl")]),
              StageConfig(name="prediction", epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])]
    cfg = distill_cfg(sentiment_csv, trained_teacher.run_dir / "model", tmp_path / "two", stages=stages,
                      student=StudentConfig(init="fresh", num_layers=2, hidden_size=16, num_attention_heads=2),
                      layer_map=LayerMapConfig(kind="last"))
    cfg.stages[0].losses[1].head_match = "group"  # 2 student heads match 4 teacher heads in pairs
    distill(cfg)
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    trained = [line for line in lines if "train_loss" in line]
    assert {line["stage"] for line in trained} == {0, 1}
    assert set(trained[0]) >= {"train_hidden_mse", "train_attention_kl"} and "train_kl" not in trained[0]
    assert "train_kl" in trained[-1] and "train_hidden_mse" not in trained[-1]


@pytest.mark.parametrize("kill_at", [5, 11])  # mid-epoch, and in the second epoch after an epoch-end checkpoint
def test_resume_after_interrupt_gives_the_same_weights(new_process, trained_teacher, sentiment_csv, tmp_path, kill_at):
    teacher_dir = trained_teacher.run_dir / "model"
    full = distill(distill_cfg(sentiment_csv, teacher_dir, tmp_path / "full")).model

    def kill(state):
        if state.global_step == kill_at:
            raise Interrupt

    resumed_cfg = distill_cfg(sentiment_csv, teacher_dir, tmp_path / "resumed")
    with pytest.raises(Interrupt):
        distill(resumed_cfg, on_step=kill)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["global_step"] < kill_at
    new_process()
    steps_after_resume = []
    resumed = distill(resumed_cfg, on_step=lambda s: steps_after_resume.append(s.global_step)).model
    assert steps_after_resume[0] == state["global_step"] + 1
    assert_same_weights(full, resumed)


def test_bad_inputs_fail_before_training(trained_teacher, sentiment_csv, tmp_path):
    teacher_dir = trained_teacher.run_dir / "model"
    cases = {
        "out of range": dict(student=StudentConfig(layers=[1, 4])),
        "heads": dict(student=StudentConfig(init="fresh", num_layers=2, hidden_size=30, num_attention_heads=3)),
        "column": dict(data=DataConfig(source=str(sentiment_csv), text_column="body", label_column="sentiment")),
        "loss": dict(stages=[StageConfig(losses=[LossConfig(name="kld")])]),
    }
    expected = {"out of range": r"student.layers \[4\] out of range", "heads": "3 attention heads and teacher 4",
                "column": "data.text_column='body' is not a column", "loss": "unknown loss 'kld'; did you mean 'kl'"}
    for case, overrides in cases.items():
        with pytest.raises(ConfigError, match=expected[case]):
            distill(distill_cfg(sentiment_csv, teacher_dir, tmp_path / case, **overrides), on_step=never_train)


def test_tokenizer_mismatch_is_an_error(trained_teacher, sentiment_csv, tmp_path):
    other = tmp_path / "other-student"
    tokenizer = make_tokenizer(["completely", "different", "words"])
    BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_hidden_layers=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = distill_cfg(sentiment_csv, trained_teacher.run_dir / "model", tmp_path / "mismatch",
                      student=StudentConfig(init="pretrained", model=str(other)))
    with pytest.raises(ConfigError, match="student and teacher tokenizers differ"):
        distill(cfg, on_step=never_train)


def test_gradient_accumulation_matches_the_larger_batch(new_process, sentiment_csv, tmp_path):
    folder = tmp_path / "no-dropout"
    tokenizer = make_tokenizer(["the", "film", "good", "bad", "dull", "great", "was", "a", "movie", "plot"])
    torch.manual_seed(0)
    config = tiny_bert_config(len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def run(name, batch_size, accumulation):
        train = train_cfg(batch_size=batch_size, gradient_accumulation_steps=accumulation, group_by_length=False,
                          max_steps_per_stage=4, select_best=False)
        cfg = FinetuneConfig(model=str(folder), output_dir=str(tmp_path / name), data=data_cfg(sentiment_csv),
                             stage=StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="ce")]),
                             train=train)
        model = finetune(cfg).model
        new_process()
        return model

    whole, accumulated = run("whole", 16, 1), run("accumulated", 8, 2)
    initial = BertForSequenceClassification.from_pretrained(folder)
    assert not torch.equal(whole.classifier.weight, initial.classifier.weight)
    assert_same_weights(whole, accumulated, atol=1e-5)


def test_resuming_with_a_different_config_is_refused(tiny_teacher_dir, sentiment_csv, tmp_path):
    cfg = distill_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "run",
                      stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])])

    def kill(state):
        if state.global_step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(cfg, on_step=kill)
    cfg.stages[0].learning_rate = 5e-4
    with pytest.raises(ConfigError, match="unfinished run with a different config"):
        distill(cfg, on_step=never_train)


def test_planned_batches_are_the_batches_the_trainer_trains_on(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_RANK_TRACE", str(tmp_path / "trace"))
    monkeypatch.setattr(RankTrace, "batches_kept", 100)
    steps = 12  # 139 training sentences in batches of 16: 9 per epoch, the 9th short, then into the second epoch
    cfg = distill_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "student", stages=[StageConfig(
        epochs=2, losses=[LossConfig(name="kl")])], train=train_cfg(max_steps_per_stage=steps))
    distill(cfg)
    trained_on = json.loads((tmp_path / "trace" / "rank-0.json").read_text())["batches"]

    train_set = load_task(cfg.data, cfg.teacher).splits["train"]
    planned = planned_batches(train_sampler(train_set, cfg.train, cfg.seed), cfg.train.batch_size, steps)
    assert [len(batch) for batch in planned] == [16] * 8 + [11] + [16] * 3
    assert trained_on == [[train_set[i]["input_ids"] for i in batch] for batch in planned]
