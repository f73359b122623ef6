"""Data-parallel runs: a real two-process CPU (gloo) launch of the distillation recipe; a born-again chain, whose
generations run one after another in the same processes; a process that fails mid-training ends the launch instead of
leaving its peer waiting; and launches refused."""
import json

import pytest
import yaml

from distill.core.config import LossConfig, StageConfig, StudentConfig
from distill.core.errors import ConfigError
from distill.encoder import job as run
from distill.encoder.config import DistillConfig
from tests.conftest import REPO, data_cfg, launch_two_processes, train_cfg


def test_two_processes_share_the_data_and_end_with_the_same_student(sentiment_csv, tiny_teacher_dir, tmp_path):
    out, trace = tmp_path / "student", tmp_path / "trace"
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": str(tiny_teacher_dir), "output_dir": str(out),
        "data": {"source": str(sentiment_csv), "text_column": "review", "label_column": "sentiment",
                 "max_length": 16},
        "student": {"layers": [1, 3]},
        "stages": [{"epochs": 1, "learning_rate": 1e-3,
                    "losses": [{"name": "kl", "temperature": 2.0}, {"name": "ce"}]}],
        "train": {"batch_size": 8, "eval_batch_size": 32, "log_steps": 2, "save_steps": 3, "max_steps_per_stage": 4},
    }))
    done = launch_two_processes(REPO / "recipes" / "distill_student.py", ["--config", str(config)], tmp_path,
                                {"DISTILL_RANK_TRACE": str(trace)})
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((trace / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert sorted(p.name for p in trace.iterdir()) == ["rank-0.json", "rank-1.json"]
    for first, second in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert len(first) == len(second) == 8
        assert not {tuple(ids) for ids in first} & {tuple(ids) for ids in second}  # each rank its own examples
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json", "model"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("final" in r for r in records) == 1 and sum("layer_map" in r for r in records) == 1
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4]


FAIL_ON_RANK_1 = """import dataclasses
import os
from distill.core.cli import run_recipe
from distill.encoder.job import DISTILL


def fail(state):
    if state.global_step == 2 and os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 failed at step 2")


run_recipe(dataclasses.replace(DISTILL, run=lambda cfg: DISTILL.run(cfg, on_step=fail)))
"""


def encoder_config(tmp_path, teacher, csv, **values):
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": str(teacher), "output_dir": str(tmp_path / "student"),
        "data": {"source": str(csv), "text_column": "review", "label_column": "sentiment", "max_length": 16},
        "student": {"layers": [1, 3]},
        "stages": [{"epochs": 1, "learning_rate": 1e-3, "losses": [{"name": "kl", "temperature": 2.0}]}],
        "train": {"batch_size": 8, "eval_batch_size": 32, "save_steps": 3, "max_steps_per_stage": 4}, **values}))
    return config


def test_a_born_again_chain_runs_its_generations_in_the_same_two_processes(sentiment_csv, tiny_teacher_dir, tmp_path):
    config = encoder_config(tmp_path, tiny_teacher_dir, sentiment_csv, generations=2)
    done = launch_two_processes(REPO / "recipes" / "distill_student.py", ["--config", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert [row["generation"] for row in summary["generations"]] == [1, 2]
    assert summary["generations"][1]["teacher"] == str(tmp_path / "student" / "generation-1" / "model")


def test_a_process_that_fails_ends_the_launch_with_its_error(sentiment_csv, tiny_teacher_dir, tmp_path):
    config = encoder_config(tmp_path, tiny_teacher_dir, sentiment_csv)
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    done = launch_two_processes(script, ["--config", str(config)], tmp_path, timeout=120)  # a hang fails here
    assert done.returncode != 0
    assert "rank 1 failed at step 2" in done.stderr
    assert not (tmp_path / "student" / "metrics.json").exists()


def test_processes_that_accelerate_does_not_join_are_refused(tiny_teacher_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; Accelerate without GPUs then runs each alone
    with pytest.raises(ConfigError, match="started 2 processes but Accelerate joined 1.*ACCELERATE_USE_CPU=1"):
        run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_launch_overriding_gradient_accumulation_is_refused(tiny_teacher_dir, sentiment_csv, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # what a DeepSpeed config's value sets
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 4 .* train.gradient_accumulation_steps is 1"):
        run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path))


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3", "ZeRO-3 .* train.sharding: fsdp2"),
    ("ACCELERATE_USE_FSDP", "true", "Accelerate's FSDP launch .* train.sharding: fsdp2")])
def test_launches_that_would_shard_where_the_trainer_cannot_are_refused(tiny_teacher_dir, sentiment_csv, tmp_path,
                                                                         monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)  # what accelerate launch sets from a ZeRO-3 or an FSDP config
    with pytest.raises(ConfigError, match=message):
        run.distill(small_cfg(tiny_teacher_dir, sentiment_csv, tmp_path))
    assert not (tmp_path / "out").exists()


def small_cfg(teacher, csv, tmp_path) -> DistillConfig:
    return DistillConfig(teacher=str(teacher), output_dir=str(tmp_path / "out"), data=data_cfg(csv),
                         student=StudentConfig(layers=[1, 3]),
                         stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])],
                         train=train_cfg(max_steps_per_stage=2))
