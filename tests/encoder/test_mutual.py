"""Deep mutual learning: the peer loss, gradients that stay with each student, a cohort run that trains, selects,
saves and resumes every student, and refused configs."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core.config import LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.loss_interface import LOSSES, LossInputs, LossSetup, build_losses
from distill.core.trainer import Objective
from distill.encoder import mutual, single
from distill.encoder.config import DistillConfig, FinetuneConfig, MutualConfig
from distill.encoder.finetune import finetune
from distill.encoder.job import distill
from distill.encoder.mutual import Cohort, MutualObjective
from distill.encoder.single import build_distill_student, load_teacher
from tests.conftest import assert_same_weights, data_cfg, never_train, train_cfg

LN3 = math.log(3)
# Student logits [0, 0] and [2 ln 3, 0] at T = 2 give the distributions [1/2, 1/2] and [3/4, 1/4].
KL_FROM_SECOND = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))  # T^2 KL([3/4, 1/4] || [1/2, 1/2])
KL_FROM_FIRST = 4 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))  # T^2 KL([1/2, 1/2] || [3/4, 1/4])
TEXTS = ["the film was good", "a dull and boring plot", "very lovely acting"]


def peer_kl_on(student: list[float], peers: list[list[float]]) -> float:
    loss = LOSSES["peer_kl"](LossConfig(name="peer_kl", temperature=2.0), LossSetup(None, None, None))
    inputs = LossInputs(SequenceClassifierOutput(logits=torch.tensor([student])), None, torch.tensor([0]),
                        torch.ones(1, 3), [torch.tensor([peer]) for peer in peers])
    return loss(inputs).item()


def test_peer_kl_is_the_mean_softened_kl_from_each_peer():
    assert peer_kl_on([0.0, 0.0], [[2 * LN3, 0.0]]) == pytest.approx(KL_FROM_SECOND, rel=1e-5)
    assert peer_kl_on([2 * LN3, 0.0], [[0.0, 0.0]]) == pytest.approx(KL_FROM_FIRST, rel=1e-5)
    assert peer_kl_on([0.0, 0.0], [[2 * LN3, 0.0], [0.0, 0.0]]) == pytest.approx(KL_FROM_SECOND / 2, rel=1e-5)


class FixedLogits(nn.Module):
    """A stand-in student whose logits are its only parameter."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([logits]))

    def forward(self, **inputs):
        return SequenceClassifierOutput(logits=self.logits)


def mutual_objective(*logits: list[float]) -> MutualObjective:
    specs = [LossConfig(name="ce", weight=0.0), LossConfig(name="peer_kl", temperature=2.0)]
    members = [FixedLogits(values) for values in logits]
    objectives = [Objective(member, build_losses(specs, LossSetup(None, None, None))) for member in members]
    return MutualObjective(Cohort(members), objectives)


def test_each_student_is_pulled_towards_its_peer_and_gets_no_gradient_through_the_peer_targets():
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3),
             "labels": torch.tensor([0])}
    objective = mutual_objective([0.0, 0.0], [2 * LN3, 0.0])
    total, parts = objective(batch)
    assert parts["peer_kl"].item() == pytest.approx(KL_FROM_SECOND, rel=1e-5)
    assert parts["peer_kl_peer0"].item() == pytest.approx(KL_FROM_FIRST, rel=1e-5)
    assert total.item() == pytest.approx(KL_FROM_SECOND + KL_FROM_FIRST, rel=1e-5)
    total.backward()
    # d/dz of T^2 KL(p_peer || softmax(z / T)) is T (softmax(z / T) - p_peer): nothing from the other's term.
    first, second = objective.student.members
    assert first.logits.grad[0].tolist() == pytest.approx([-0.5, 0.5], abs=1e-5)
    assert second.logits.grad[0].tolist() == pytest.approx([0.5, -0.5], abs=1e-5)

    agreeing = mutual_objective([1.0, -1.0], [1.0, -1.0])
    total, parts = agreeing(batch)
    total.backward()
    assert parts["peer_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert all(member.logits.grad.abs().max().item() < 1e-6 for member in agreeing.student.members)


def mutual_cfg(csv, teacher, out, losses, peers, **overrides):
    data = data_cfg(csv)
    data.max_train_examples = 48  # three steps an epoch
    values = dict(teacher=str(teacher), output_dir=str(out), data=data, student=StudentConfig(layers=[1, 3]),
                  mutual=MutualConfig(peers=peers),
                  stages=[StageConfig(epochs=2, learning_rate=1e-3, losses=losses)], train=train_cfg())
    values.update(overrides)
    return DistillConfig(**values)


DML_LOSSES = [LossConfig(name="ce"), LossConfig(name="peer_kl", temperature=2.0)]


def logits_of(model, tokenizer):
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def test_a_cohort_with_a_teacher_trains_and_saves_every_student(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    initial, teacher_calls = [], []

    def recording_build(*args):
        student, setup = build_distill_student(*args)
        initial.append({name: p.detach().clone() for name, p in student.named_parameters()})
        return student, setup

    def counting_load(*args):
        teacher = load_teacher(*args)
        teacher.register_forward_hook(lambda *_: teacher_calls.append(torch.is_grad_enabled()))
        return teacher

    monkeypatch.setattr(single, "build_distill_student", recording_build)
    monkeypatch.setattr(single, "load_teacher", counting_load)
    losses = [LossConfig(name="ce"), LossConfig(name="kl", temperature=2.0), LossConfig(name="hidden_mse"),
              LossConfig(name="peer_kl", temperature=2.0, schedule="linear", final_weight=2.0),
              LossConfig(name="early_exit", exit_layers=[1])]
    peers = [StudentConfig(layers=[0, 2]), StudentConfig(init="fresh", num_layers=2, hidden_size=16,
                                                         num_attention_heads=2)]
    result = distill(mutual_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "run", losses, peers))

    run_dir = result.run_dir
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json", "model",
                                                   "peer-0", "peer-1"}
    assert teacher_calls == [False] * 6  # once a batch, without gradients: 2 epochs of 3 batches
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    for model, folder, before in zip([result.model, *result.peers], ["model", "peer-0/model", "peer-1/model"],
                                     initial):
        reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / folder)
        assert torch.equal(logits_of(reloaded, tokenizer), logits_of(model, tokenizer)), folder
        unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
        assert not unchanged, folder
    assert result.peers[1].config.hidden_size == 16
    heads = [(run_dir / folder / "early_exit.safetensors").read_bytes() for folder in ("model", "peer-0/model", "peer-1/model")]
    assert len(set(heads)) == 3  # each student's own exit heads, saved with it

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test_accuracy", "test_accuracy_peer0", "test_accuracy_peer1", "disk_mb_peer1"} <= set(metrics)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "validation_accuracy_peer1" in line]
    assert [line["epoch"] for line in evaluated] == [0, 1] and all("validation_accuracy" in line for line in evaluated)
    trained = next(line for line in lines if "train_loss" in line)
    assert {f"train_{name}{suffix}" for name in ("ce", "kl", "hidden_mse", "peer_kl")
            for suffix in ("", "_peer0", "_peer1")} <= set(trained)
    assert 1.0 < trained["weight_peer_kl"] < 2.0  # the schedule moves every student's peer weight alike


def same_weights(model, snapshot) -> bool:
    return all(torch.equal(p, snapshot[name]) for name, p in model.named_parameters())


def test_each_student_keeps_the_weights_of_its_own_best_epoch(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    scores = iter([0.9, 0.5, 0.5, 0.9])  # epoch 0: student, peer; epoch 1: student, peer
    seen = []

    def scripted_accuracy(model, loader, accelerator):
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return next(scores)

    monkeypatch.setattr(mutual, "accuracy", scripted_accuracy)
    result = distill(mutual_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "run", DML_LOSSES,
                                [StudentConfig(layers=[0, 2])]))
    student_epoch0, peer_epoch0, student_epoch1, peer_epoch1 = seen
    assert same_weights(result.model, student_epoch0) and same_weights(result.peers[0], peer_epoch1)
    assert not torch.equal(student_epoch0["classifier.weight"], student_epoch1["classifier.weight"])
    assert not torch.equal(peer_epoch0["classifier.weight"], peer_epoch1["classifier.weight"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "validation_accuracy" in line and "final" not in line]
    assert [(line["validation_accuracy"], line["validation_accuracy_peer0"]) for line in evaluated] == [
        (0.9, 0.5), (0.5, 0.9)]


class Interrupt(Exception):
    pass


def test_resume_after_a_kill_gives_every_student_the_same_weights(new_process, tiny_teacher_dir, sentiment_csv,
                                                                  tmp_path):
    peers = [StudentConfig(layers=[0, 2])]
    full = distill(mutual_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "full", DML_LOSSES, peers))

    def kill(state):
        if state.global_step == 5:  # in the second epoch, after the first epoch's evaluation and checkpoint
            raise Interrupt

    resumed_cfg = mutual_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "resumed", DML_LOSSES, peers)
    with pytest.raises(Interrupt):
        distill(resumed_cfg, on_step=kill)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["best_metrics"]) == 2
    new_process()
    resumed = distill(resumed_cfg)
    assert_same_weights(full.model, resumed.model)
    assert_same_weights(full.peers[0], resumed.peers[0])


def test_bad_mutual_configs_are_refused(tiny_teacher_dir, sentiment_csv, tmp_path):
    missing = tmp_path / "no-teacher"  # errors must come before anything is loaded
    with pytest.raises(ConfigError, match="loss 'peer_kl' needs peer students; list them in mutual.peers"):
        distill(mutual_cfg(sentiment_csv, missing, tmp_path / "a", DML_LOSSES, []))
    with pytest.raises(ConfigError, match="mutual.peers lists 1 student.* no stage has the 'peer_kl' loss"):
        distill(mutual_cfg(sentiment_csv, missing, tmp_path / "b", [LossConfig(name="ce")], [StudentConfig()]))
    with pytest.raises(ConfigError, match="generations > 1 and mutual.peers cannot be combined"):
        distill(mutual_cfg(sentiment_csv, missing, tmp_path / "g", DML_LOSSES, [StudentConfig()], generations=2))
    with pytest.raises(ConfigError, match="'peer_kl' needs peer students"):
        finetune(FinetuneConfig(model=str(missing), stage=StageConfig(losses=DML_LOSSES)))
    with pytest.raises(ConfigError, match=r"mutual.peers\[0\]: student.layers \[9\] out of range"):
        distill(mutual_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "c", DML_LOSSES, [StudentConfig(layers=[0, 9])]),
                on_step=never_train)
    with pytest.raises(ConfigError, match=r"unknown config key 'mutual.peers\[0\].layer'; did you mean 'layers'"):
        parse_args(DistillConfig, ["mutual.peers=[{layer: [0, 2]}]"])
