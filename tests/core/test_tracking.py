"""Experiment tracking through Accelerate (`train.report_to`): TensorBoard receives the logged scalars; off by
default; unknown or missing trackers refused before training."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.core import run as core_run
from distill.core.config import LossConfig, StageConfig, StudentConfig
from distill.core.errors import ConfigError
from distill.encoder import job as run
from distill.encoder.config import DistillConfig
from tests.conftest import data_cfg, never_train, train_cfg


def small_cfg(teacher, csv, out, **train) -> DistillConfig:
    return DistillConfig(teacher=str(teacher), output_dir=str(out), data=data_cfg(csv),
                         student=StudentConfig(layers=[1, 3]),
                         stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])],
                         train=train_cfg(max_steps_per_stage=4, **train))


def test_tensorboard_receives_losses_lr_and_accuracy(tiny_teacher_dir, sentiment_csv, tmp_path):
    result = run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path / "student", report_to=["tensorboard"],
                                   tracking_dir=str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb" / "student"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["stage0/train_loss"]] == [2, 4]
    assert [step for step, _ in scalars["stage0/train_kl"]] == [2, 4]
    assert [step for step, _ in scalars["stage0/lr"]] == [2, 4]
    assert scalars["stage0/validation_accuracy"][0][0] == 4
    assert scalars["final/test_accuracy"][0][1] == pytest.approx(result.metrics["test_accuracy"])


def test_nothing_is_tracked_by_default(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path / "student"))
    assert {p.name for p in (tmp_path / "student").iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json",
                                                                  "model"}
    assert {p.name for p in tmp_path.iterdir()} == {"sentiment.csv", "teacher", "student"}


def test_unknown_or_missing_trackers_are_refused(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path / "a", report_to=["tensorbord"]), never_train)
    monkeypatch.setattr(core_run, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="tracker 'comet_ml' needs its package: pip install comet-ml"):
        run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path / "b", report_to=["comet_ml"]), never_train)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
