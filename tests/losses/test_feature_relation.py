"""Feature-based (FitNet hint) and relation-based (RKD, similarity) losses: hand values on tiny tensors, the
invariances they must keep, their config errors, and short distillation runs with stages and schedules."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.config import LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup, build_losses, check_stages
from distill.core.mapping import LayerMap, build_layer_map
from distill.encoder.config import DistillConfig
from distill.encoder.job import distill
from distill.losses.hidden import hidden_mse
from distill.losses.pooling import pool
from distill.losses.relation import rkd_angle, rkd_distance, similarity_mse
from tests.conftest import data_cfg, tiny_bert_config, train_cfg

TEACHER_TRIANGLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
STUDENT_TRIANGLE = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])


def huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def test_rkd_distance_hand_value_on_three_points():
    teacher = [1.0, 1.0, math.sqrt(2)]  # pairs (0,1), (0,2), (1,2)
    student = [2.0, 1.0, math.sqrt(5)]
    t_mean, s_mean = sum(teacher) / 3, sum(student) / 3
    expected = sum(huber(s / s_mean - t / t_mean) for s, t in zip(student, teacher)) / 3
    assert rkd_distance(STUDENT_TRIANGLE, TEACHER_TRIANGLE).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_hand_value_on_three_points():
    # Angle cosines at each vertex: teacher right isosceles triangle (90, 45, 45 degrees); the student's is
    # stretched along x: at (2,0) between (-2,0) and (-2,1), at (0,1) between (0,-1) and (2,-1).
    teacher = [0.0, math.sqrt(0.5), math.sqrt(0.5)]
    student = [0.0, 4 / (2 * math.sqrt(5)), 1 / math.sqrt(5)]
    expected = sum(huber(s - t) for s, t in zip(student, teacher)) / 3
    assert rkd_angle(STUDENT_TRIANGLE, TEACHER_TRIANGLE).item() == pytest.approx(expected, rel=1e-5)


def test_similarity_hand_value_on_a_2x2_cosine_matrix():
    student = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # cosine matrix [[1, 0], [0, 1]]
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # [[1, 1/sqrt 2], [1/sqrt 2, 1]]
    expected = 2 * (1 / math.sqrt(2)) ** 2 / 4
    assert similarity_mse(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_relations_ignore_scale_and_width_and_tolerate_tiny_batches():
    torch.manual_seed(0)
    teacher = torch.randn(5, 4)
    student = torch.cat([3 * teacher, torch.zeros(5, 2)], dim=1)  # scaled copy, two more dimensions
    for relation in (rkd_distance, rkd_angle, similarity_mse):
        assert relation(student, teacher).item() == pytest.approx(0.0, abs=1e-6), relation.__name__
        assert relation(student[:1], teacher[:1]).item() == 0.0  # nothing to relate in a batch of one


def test_duplicate_examples_give_finite_gradients():
    student = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    (rkd_distance(student, teacher) + rkd_angle(student, teacher) + similarity_mse(student, teacher)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_pooling_takes_the_first_token_or_the_mean_over_real_tokens():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(states, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(states, mask, "mean").tolist() == [[2.0, 3.0]]


def _setup(student_overrides=None):
    """A 2-layer student mapped onto a 4-layer teacher: student hidden state j <- teacher hidden state 2j."""
    student = tiny_bert_config(20, num_hidden_layers=2, **(student_overrides or {}))
    return LossSetup(student, tiny_bert_config(20), LayerMap(hidden=[(0, 0), (1, 2), (2, 4)]))


def _inputs(student_states, teacher_states, mask):
    return LossInputs(SequenceClassifierOutput(hidden_states=student_states),
                      SequenceClassifierOutput(hidden_states=teacher_states), torch.zeros(len(mask)), mask)


def _built(name, setup=None, **options):
    return build_losses([LossConfig(name=name, **options)], setup or _setup())[name]


def test_hint_defaults_to_the_student_middle_layer_and_its_mapped_partner():
    hint = _built("hint")
    assert (hint.student_layer, hint.teacher_layer) == (1, 2)
    assert (_built("hint", teacher_layer=3).student_layer, _built("hint", student_layer=2).teacher_layer) == (1, 4)
    rkd = _built("rkd_distance")
    assert (rkd.student_layer, rkd.teacher_layer) == (2, 4)  # relation losses default to the last layer


def test_hint_starts_neutral_when_widths_are_equal():
    hint = _built("hint", student_layer=1, teacher_layer=1)
    assert torch.equal(hint.regressor.weight, torch.eye(32)) and not hint.regressor.bias.any()
    states = tuple(torch.randn(2, 5, 32) for _ in range(5))
    loss = hint(_inputs(states[:3], states, torch.ones(2, 5)))
    assert loss.item() == 0.0
    loss.backward()
    assert hint.regressor.weight.grad is not None


def test_hint_regresses_a_narrower_student_and_ignores_padding():
    hint = _built("hint", _setup({"hidden_size": 16, "num_attention_heads": 2}))
    assert (hint.regressor.in_features, hint.regressor.out_features) == (16, 32)
    student = tuple(torch.randn(2, 4, 16) for _ in range(3))
    teacher = tuple(torch.randn(2, 4, 32) for _ in range(5))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = hidden_mse(hint.regressor(student[1]), teacher[2], mask)
    assert torch.allclose(hint(_inputs(student, teacher, mask)), expected)
    noisy_padding = tuple(t.clone().index_fill_(1, torch.tensor([3]), 1e3) for t in teacher)
    assert torch.allclose(hint(_inputs(student, noisy_padding, mask)), expected)


@pytest.mark.parametrize("options, message", [
    (dict(student_layer=3), "student_layer 3 is out of range; the student has hidden states 0..2"),
    (dict(student_layer=-1), "student_layer -1 is out of range; the student has hidden states 0..2"),
    (dict(teacher_layer=5), r"teacher_layer 5 is out of range; the teacher has hidden states 0..4 \(0 = embedding"),
])
@pytest.mark.parametrize("name", ["hint", "rkd_angle"])
def test_layer_indices_out_of_range_fail_when_the_loss_is_built(name, options, message):
    with pytest.raises(ConfigError, match=f"loss '{name}': {message}"):
        _built(name, **options)


def test_fitnet_recipe_spells_out_the_default_hint_layers():
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "distill_fitnet.yaml"
    cfg = parse_args(DistillConfig, ["--config", str(recipe)])
    layer_map = build_layer_map(cfg.layer_map, 3, 6)  # its 3-layer student of a 6-layer teacher
    setup = LossSetup(tiny_bert_config(20, num_hidden_layers=3), tiny_bert_config(20, num_hidden_layers=6), layer_map)
    spec = cfg.stages[0].losses[0]
    default = _built("hint", setup)
    assert (spec.student_layer, spec.teacher_layer) == (default.student_layer, default.teacher_layer) == (2, 4)


def test_unknown_pooling_is_found_before_any_model_loads():
    stage = StageConfig(losses=[LossConfig(name="similarity", pooling="max")])
    with pytest.raises(ConfigError, match=r"stages\[0\]: loss 'similarity': pooling must be one of cls, mean; got 'max'"):
        check_stages([stage])


# ----- short runs on the tiny fixtures ----------------------------------------------------------------------------
def run_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_reloads(result):
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    batch = tokenizer(["the film was good", "a dull and boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, result.model.eval()(**batch).logits)


def test_fitnet_hint_stage_then_kd_stage(tiny_teacher_dir, sentiment_csv, tmp_path):
    stages = [StageConfig(name="hint", epochs=1, learning_rate=3e-3, losses=[LossConfig(name="hint")]),
              StageConfig(name="kd", epochs=1, learning_rate=1e-3,
                          losses=[LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5)])]
    student = StudentConfig(init="fresh", num_layers=2, hidden_size=16, num_attention_heads=2)
    cfg = DistillConfig(teacher=str(tiny_teacher_dir), output_dir=str(tmp_path / "fitnet"),
                        data=data_cfg(sentiment_csv), student=student, stages=stages, train=train_cfg(log_steps=1))
    result = distill(cfg)
    trained = [r for r in run_records(result.run_dir) if "train_loss" in r]
    hint = [r["train_hint"] for r in trained if r["stage"] == 0]
    assert all("train_hint" not in r and "train_kl" in r for r in trained if r["stage"] == 1)
    assert sum(hint[-3:]) < 0.8 * sum(hint[:3])  # the guided layer moves towards the hint
    assert_reloads(result)


def test_rkd_with_a_linear_schedule_logs_the_moving_values(tiny_teacher_dir, sentiment_csv, tmp_path):
    losses = [LossConfig(name="kl", temperature=4.0, schedule="linear", final_temperature=1.0),
              LossConfig(name="rkd_distance", weight=25.0, schedule="linear", final_weight=5.0, pooling="mean"),
              LossConfig(name="rkd_angle", weight=50.0, pooling="mean")]
    cfg = DistillConfig(teacher=str(tiny_teacher_dir), output_dir=str(tmp_path / "rkd"),
                        data=data_cfg(sentiment_csv), student=StudentConfig(layers=[1, 3]),
                        stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=losses)],
                        train=train_cfg(log_steps=1, max_steps_per_stage=6))
    result = distill(cfg)
    trained = [r for r in run_records(result.run_dir) if "train_loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    for r in trained:  # the batches of step s ran at progress (s - 1) / 6
        progress = (r["step"] - 1) / 6
        assert r["temperature_kl"] == pytest.approx(4.0 - 3.0 * progress)
        assert r["weight_rkd_distance"] == pytest.approx(25.0 - 20.0 * progress)
        assert "weight_kl" not in r and "weight_rkd_angle" not in r
        assert math.isfinite(r["train_rkd_distance"]) and math.isfinite(r["train_rkd_angle"])
    assert_reloads(result)
