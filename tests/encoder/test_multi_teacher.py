"""Multi-teacher distillation: the mixture target, teacher weights, refused teachers and a short run."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.config import LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup, build_losses
from distill.encoder.config import DistillConfig
from distill.encoder.job import distill
from distill.encoder.multi_teacher import TeacherEnsemble, normalised_teacher_weights
from distill.losses.response import EnsembleOutput, mixture_log_probs, soft_kl
from tests.conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    data_cfg,
    make_tokenizer,
    never_train,
    tiny_bert_config,
    train_cfg,
)

KL_AND_CE = [LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5)]


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def response_losses(teacher_output, student_logits):
    built = build_losses([LossConfig(name="kl", temperature=2.0), LossConfig(name="logit_mse")],
                         LossSetup(tiny_bert_config(20), tiny_bert_config(20), None))
    inputs = LossInputs(SequenceClassifierOutput(logits=student_logits), teacher_output,
                        torch.zeros(1, dtype=torch.long), torch.ones(1, 3))
    return built["kl"](inputs), built["logit_mse"](inputs)


def test_kl_targets_the_weighted_mixture_of_softened_teacher_distributions():
    z1, z2, student = [0.0, 2.0], [1.0, 0.0], [1.0, 0.0]
    t, w = 2.0, [0.75, 0.25]
    p1, p2 = softmax([v / t for v in z1]), softmax([v / t for v in z2])
    mixture = [w[0] * a + w[1] * b for a, b in zip(p1, p2)]  # [0.3455..., 0.6545...]
    q = softmax([v / t for v in student])
    expected_kl = sum(m * math.log(m / qi) for m, qi in zip(mixture, q)) * t * t
    mean_logits = [w[0] * a + w[1] * b for a, b in zip(z1, z2)]  # [0.25, 1.5]
    expected_mse = sum((s - m) ** 2 for s, m in zip(student, mean_logits)) / 2

    members, weights = torch.tensor([[z1], [z2]]), torch.tensor(w)
    assert mixture_log_probs(members, weights, t).exp()[0].tolist() == pytest.approx(mixture, rel=1e-6)
    teachers = EnsembleOutput(logits=torch.tensor([mean_logits]), member_logits=members, weights=weights)
    kl, mse = response_losses(teachers, torch.tensor([student]))
    assert kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert mse.item() == pytest.approx(expected_mse, rel=1e-6)
    # mixing probabilities is not the same as distilling towards the mean logits
    assert kl.item() != pytest.approx(soft_kl(torch.tensor([student]), torch.tensor([mean_logits]), t).item(), rel=1e-3)


def test_an_ensemble_of_one_teacher_gives_exactly_todays_kl(bert, tokenizer):
    batch = tokenizer(["the film was good", "a dull plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        alone = bert(**batch)
        together = TeacherEnsemble([bert], [1.0])(**batch)
    student_logits = torch.tensor([[0.3, -0.4], [1.2, 0.5]])
    kl = build_losses([LossConfig(name="kl", temperature=2.0)], LossSetup(bert.config, bert.config, None))["kl"]
    today = soft_kl(student_logits, alone.logits, 2.0)
    inputs = LossInputs(SequenceClassifierOutput(logits=student_logits), together, torch.zeros(2, dtype=torch.long),
                        batch["attention_mask"])
    assert torch.equal(kl(inputs), today)
    assert torch.equal(together.logits, alone.logits)


def test_ensemble_averages_logits_and_keeps_the_first_teachers_hidden_states(bert, tokenizer):
    torch.manual_seed(1)
    deeper = BertForSequenceClassification(tiny_bert_config(len(tokenizer), num_hidden_layers=6,
                                                            hidden_size=48)).eval()
    batch = tokenizer(["very lovely acting"], return_tensors="pt")
    with torch.no_grad():
        out = TeacherEnsemble([bert, deeper], [0.75, 0.25])(**batch, output_hidden_states=True)
        z1, z2 = bert(**batch).logits, deeper(**batch).logits
    assert torch.allclose(out.logits, 0.75 * z1 + 0.25 * z2, atol=1e-6)
    assert len(out.hidden_states) == 5 and out.hidden_states[-1].shape[-1] == 32  # the first teacher's 4 layers


def weights_of(extra: int, weights):
    cfg = DistillConfig(extra_teachers=[f"t{i}" for i in range(extra)], teacher_weights=weights)
    return normalised_teacher_weights(cfg)


def test_teacher_weights_are_normalised_and_checked():
    assert weights_of(2, None) == pytest.approx([1 / 3] * 3)
    assert weights_of(2, [2.0, 1.0, 1.0]) == [0.5, 0.25, 0.25]
    assert weights_of(1, [0.0, 3.0]) == [0.0, 1.0]
    with pytest.raises(ConfigError, match="teacher_weights lists 2 weights for 3 teachers"):
        weights_of(2, [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"teacher_weights\[1\] is -0.5; weights must not be negative"):
        weights_of(1, [1.0, -0.5])
    with pytest.raises(ConfigError, match="teacher_weights sum to 0"):
        weights_of(1, [0.0, 0.0])


def save_teacher(folder, words=POSITIVE + NEGATIVE + NEUTRAL, seed=1, **config):
    tokenizer = make_tokenizer(words)
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config(len(tokenizer), **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def multi_cfg(csv, first, extras, out, **overrides):
    values = dict(teacher=str(first), extra_teachers=extras, output_dir=str(out), data=data_cfg(csv),
                  student=StudentConfig(layers=[1, 3]), stages=[StageConfig(epochs=1, learning_rate=1e-3,
                                                                            losses=KL_AND_CE)],
                  train=train_cfg(max_steps_per_stage=3))
    values.update(overrides)
    return DistillConfig(**values)


def test_bad_weights_are_refused_before_anything_loads(sentiment_csv, tmp_path):
    cfg = multi_cfg(sentiment_csv, tmp_path / "no-such-teacher", ["other"], tmp_path / "run", teacher_weights=[1.0])
    with pytest.raises(ConfigError, match="teacher_weights lists 1 weights for 2 teachers"):
        distill(cfg, on_step=never_train)


def test_teachers_with_other_labels_or_tokenizers_are_refused_before_training(sentiment_csv, tiny_teacher_dir,
                                                                              tmp_path):
    three = save_teacher(tmp_path / "three", num_labels=3, id2label={0: "neg", 1: "pos", 2: "mixed"},
                         label2id={"neg": 0, "pos": 1, "mixed": 2})
    swapped = save_teacher(tmp_path / "swapped", id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    other_words = save_teacher(tmp_path / "words", words=POSITIVE + NEGATIVE + NEUTRAL + ["extra"])
    fine = save_teacher(tmp_path / "fine")
    expected = {
        three: rf"extra teacher '{three}' predicts the labels \['neg', 'pos', 'mixed'\], the first teacher "
               r"\['neg', 'pos'\]",
        swapped: rf"extra teacher '{swapped}' predicts the labels \['pos', 'neg'\]",
        other_words: rf"extra teacher '{other_words}': its tokenizer differs from the first teacher's "
                     r"\(vocabulary sizes 30 and 29, 1 entries not shared\)",
    }
    for bad, message in expected.items():
        cfg = multi_cfg(sentiment_csv, tiny_teacher_dir, [fine, bad], tmp_path / "run")
        with pytest.raises(ConfigError, match=message):
            distill(cfg, on_step=never_train)


def test_short_multi_teacher_run_runs_every_teacher_once_per_batch_in_eval_mode(sentiment_csv, tiny_teacher_dir,
                                                                                tmp_path, monkeypatch):
    # the extra teachers differ in depth and width: hidden_mse only works because it reads the first teacher
    extras = [save_teacher(tmp_path / "wide", seed=1, hidden_size=48, num_hidden_layers=2),
              save_teacher(tmp_path / "deep", seed=2, num_hidden_layers=6)]
    calls = []
    forward = TeacherEnsemble.forward

    def spy(self, **inputs):
        calls.append((len(self.teachers), [t.training for t in self.teachers], torch.is_grad_enabled()))
        return forward(self, **inputs)

    monkeypatch.setattr(TeacherEnsemble, "forward", spy)
    losses = [*KL_AND_CE, LossConfig(name="hidden_mse")]
    cfg = multi_cfg(sentiment_csv, tiny_teacher_dir, extras, tmp_path / "run", teacher_weights=[2, 1, 1],
                    stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=losses)])
    result = distill(cfg)
    assert calls == [(3, [False] * 3, False)] * 3  # 3 optimizer steps, one batch each
    assert (result.run_dir / "model" / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_kl", "train_ce", "train_hidden_mse"} <= set(lines[1])
    first = BertForSequenceClassification.from_pretrained(tiny_teacher_dir)
    all_teachers = sum(p.numel() for m in [first, *map(BertForSequenceClassification.from_pretrained, extras)]
                       for p in m.parameters())
    assert lines[0]["teacher_parameters"] == all_teachers


def test_multi_teacher_recipe_passes_the_config_checks():
    cfg = parse_args(DistillConfig, ["--config", str(Path(__file__).parents[2] / "recipes" /
                                                     "distill_multi_teacher.yaml")])
    assert cfg.extra_teachers == ["runs/teacher-s1/model", "runs/teacher-s2/model"]
    assert normalised_teacher_weights(cfg) == pytest.approx([1 / 3] * 3)
    assert [(loss.name, loss.weight, loss.temperature) for loss in cfg.stages[0].losses] == [
        ("kl", 1.0, 2.0), ("ce", 0.5, 1.0)]
