import math

import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.config import LossConfig, StageConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import LOSSES, LossInputs, LossSetup, build_losses, check_stages
from distill.core.mapping import LayerMap
from distill.core.schedule import scheduled
from distill.losses.attention import attention_kl, attention_mse, match_heads
from distill.losses.hidden import hidden_cosine, hidden_mse
from distill.losses.response import logit_mse, soft_kl
from tests.conftest import tiny_bert_config


def test_soft_kl_matches_hand_computation_with_temperature_squared():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    t = 2.0
    p = [math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))]  # teacher / T
    q = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # student / T
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * t * t
    assert soft_kl(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)


def test_soft_kl_is_zero_for_equal_logits_and_batch_averaged():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 0.0]])
    assert soft_kl(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    one = soft_kl(logits[:1], logits[1:], 1.0)
    assert soft_kl(logits[:1].repeat(4, 1), logits[1:].repeat(4, 1), 1.0).item() == pytest.approx(one.item(), rel=1e-6)


def test_logit_mse_hand_value():
    assert logit_mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])).item() == pytest.approx((1 + 4) / 2)


def test_hidden_mse_ignores_padding_positions():
    student = torch.zeros(1, 3, 2)
    teacher = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # (1 + 1 + 9 + 1) / 4 values at real positions
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(3.0)


def test_hidden_cosine_hand_value():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    mask = torch.ones(1, 2)
    # 1 - cos: orthogonal -> 1, parallel -> 0
    assert hidden_cosine(student, teacher, mask).item() == pytest.approx(0.5, abs=1e-6)


def test_attention_mse_and_kl_hand_values():
    student = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # batch 1, head 1, q 2, k 2
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    mask = torch.tensor([[1, 0]])  # second query is padding
    assert attention_mse(student, teacher, mask).item() == pytest.approx((0.25 + 0.25) / 2)
    assert attention_kl(student, teacher, mask).item() == pytest.approx(math.log(2), rel=1e-5)


def test_match_heads_group_and_average():
    teacher = torch.arange(4.0).view(1, 4, 1, 1)
    student = torch.zeros(1, 2, 1, 1)
    _, grouped = match_heads(student, teacher, "group")
    assert grouped.flatten().tolist() == [0.5, 2.5]
    s_avg, t_avg = match_heads(student, teacher, "average")
    assert t_avg.flatten().tolist() == [1.5] and s_avg.shape == (1, 1, 1, 1)


def _setup(student_overrides=None):
    student = tiny_bert_config(20, num_hidden_layers=2, **(student_overrides or {}))
    teacher = tiny_bert_config(20, num_hidden_layers=4)
    return LossSetup(student, teacher, LayerMap(hidden=[(0, 0), (1, 2), (2, 4)]))


def test_hidden_loss_learns_projection_only_when_widths_differ():
    same = build_losses([LossConfig(name="hidden_mse")], _setup())["hidden_mse"]
    assert isinstance(same.projection, torch.nn.Identity)
    narrow = build_losses([LossConfig(name="hidden_mse")], _setup({"hidden_size": 16}))["hidden_mse"]
    assert narrow.projection.in_features == 16 and narrow.projection.out_features == 32

    states_s = tuple(torch.randn(2, 5, 16) for _ in range(3))
    states_t = tuple(torch.randn(2, 5, 32) for _ in range(5))
    inputs = LossInputs(SequenceClassifierOutput(hidden_states=states_s), SequenceClassifierOutput(hidden_states=states_t),
                        torch.zeros(2, dtype=torch.long), torch.ones(2, 5))
    loss = narrow(inputs)
    expected = torch.stack([hidden_mse(narrow.projection(states_s[s]), states_t[t], torch.ones(2, 5))
                            for s, t in [(0, 0), (1, 2), (2, 4)]]).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert narrow.projection.weight.grad is not None


def test_attention_loss_rejects_unmatchable_heads():
    with pytest.raises(ConfigError, match="3 attention heads and teacher 4.*'average'"):
        build_losses([LossConfig(name="attention_mse")], _setup({"num_attention_heads": 3, "hidden_size": 33}))
    with pytest.raises(ConfigError, match="divisible"):
        build_losses([LossConfig(name="attention_kl", head_match="group")],
                     _setup({"num_attention_heads": 3, "hidden_size": 33}))
    built = build_losses([LossConfig(name="attention_mse", head_match="group")], _setup({"num_attention_heads": 2}))
    assert "attention_mse" in built


def test_registry_names_closest_loss_and_needs_a_teacher():
    assert {"ce", "kl", "logit_mse", "hidden_mse", "hidden_cosine", "attention_mse", "attention_kl", "hint",
            "rkd_distance", "rkd_angle", "similarity"} <= set(LOSSES)
    with pytest.raises(ConfigError, match="did you mean 'hidden_mse'"):
        build_losses([LossConfig(name="hiden_mse")], _setup())
    no_teacher = LossSetup(tiny_bert_config(20), None, None)
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_losses([LossConfig(name="kl")], no_teacher)
    assert "ce" in build_losses([LossConfig(name="ce")], no_teacher)


@pytest.mark.parametrize("kind, expected", [
    ("constant", {0: 4.0, 0.25: 4.0, 0.5: 4.0, 1: 4.0}),
    ("linear", {0: 4.0, 0.25: 3.25, 0.5: 2.5, 1: 1.0}),
    ("cosine", {0: 4.0, 0.25: 1.0 + 3.0 * (1 + math.cos(math.pi / 4)) / 2, 0.5: 2.5, 1: 1.0}),
])
def test_schedule_values_from_start_to_end(kind, expected):
    for progress, value in expected.items():
        assert scheduled(kind, 4.0, 1.0, progress) == pytest.approx(value)
    assert scheduled(kind, 4.0, None, 0.7) == 4.0  # no final value: stays where it started


def test_kl_follows_its_temperature_schedule_and_reports_moving_values():
    kl = build_losses([LossConfig(name="kl", temperature=4.0, schedule="linear", final_temperature=1.0)],
                      _setup())["kl"]
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    inputs = LossInputs(SequenceClassifierOutput(logits=student), SequenceClassifierOutput(logits=teacher),
                        torch.zeros(1, dtype=torch.long), torch.ones(1, 1))
    for progress, temperature in [(0.0, 4.0), (0.5, 2.5), (1.0, 1.0)]:
        kl.progress = progress
        assert kl(inputs).item() == pytest.approx(soft_kl(student, teacher, temperature).item(), rel=1e-6)
        assert kl.scheduled_values() == {"temperature": pytest.approx(temperature)}  # weight does not move
        assert kl.weight == 1.0


@pytest.mark.parametrize("spec, message", [
    (dict(schedule="exponential", final_weight=0.0), r"schedule must be one of \('constant', 'linear', 'cosine'\)"),
    (dict(final_weight=0.0), "final_weight set but schedule is 'constant'"),
    (dict(final_weight=0.0, final_temperature=1.0), "final_weight and final_temperature set but schedule"),
    (dict(schedule="cosine"), "schedule 'cosine' needs final_weight or final_temperature"),
    (dict(schedule="linear", final_temperature=0.0), "final_temperature must be positive, got 0.0"),
])
def test_schedule_errors_are_found_by_check_stages(spec, message):
    stage = StageConfig(losses=[LossConfig(name="ce"), LossConfig(name="kl", **spec)])
    with pytest.raises(ConfigError, match=rf"stages\[0\]: loss 'kl': {message}"):
        check_stages([stage])


@pytest.mark.parametrize("spec, message", [
    (dict(name="kl", beta=0.3), "loss 'kl' takes no option 'beta'; its options: weight, schedule, final_weight, "
                                "temperature, final_temperature"),
    (dict(name="ce", temperature=2.0), "loss 'ce' takes no option 'temperature'; its options: weight, schedule, "
                                       "final_weight"),
    (dict(name="hidden_mse", pooling="mean"), "loss 'hidden_mse' takes no option 'pooling'"),
    (dict(name="attention_mse", chunk_size=64), "loss 'attention_mse' takes no option 'chunk_size'"),
    (dict(name="hint", exit_layers=[1]), "loss 'hint' takes no option 'exit_layers'; did you mean 'student_layer'?"),
])
def test_an_option_a_loss_does_not_read_is_an_error_naming_its_options(spec, message):
    with pytest.raises(ConfigError) as caught:
        check_stages([StageConfig(losses=[LossConfig(**spec)])])
    assert str(caught.value).startswith("stages[0]: " + message)


def test_every_option_of_every_loss_is_accepted_and_every_field_belongs_to_some_loss():
    """The declarations are the whole truth: each loss takes its own options set away from their defaults, and no
    field of LossConfig is read by no loss."""
    changed = dict(temperature=2.0, head_match="average", student_layer=1, teacher_layer=1, pooling="mean",
                   exit_layers=[1], learning_rate=1e-3, exit_label_mix=0.5, beta=0.3, topk_tail=False, chunk_size=8)
    declared = set()
    for name, cls in LOSSES.items():
        declared.update(cls.options)
        check_stages([StageConfig(losses=[LossConfig(name=name, **{key: changed[key] for key in cls.options})])],
                     peers=1 if cls.needs_peers else 0)
    assert declared == set(changed)
