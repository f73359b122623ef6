"""Born-again generations: who teaches whom, what each generation folder holds, the chain's summary, skipping
finished generations and resuming an interrupted one."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.core.config import LayerMapConfig, LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.encoder import born_again as generations
from distill.encoder.config import DistillConfig
from distill.encoder.job import distill
from distill.encoder.single import distill_single
from tests.conftest import Interrupt, data_cfg, logits_of, never_train, reset_accelerate, train_cfg

TEXTS = ["the film was good", "a dull and boring plot", "very lovely acting"]
KL_AND_CE = [LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5)]


def chain_cfg(csv, teacher, out, **overrides):
    values = dict(teacher=str(teacher), output_dir=str(out), generations=3, data=data_cfg(csv),
                  student=StudentConfig(layers=[1, 3]),
                  stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=KL_AND_CE)],
                  train=train_cfg(max_steps_per_stage=4))
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture
def runs(monkeypatch):
    """Every generation run by the chain, as (output_dir, RunResult)."""
    done = []

    def spy(cfg, on_step=None):
        result = distill_single(cfg, on_step)
        done.append((cfg.output_dir, result))
        return result

    monkeypatch.setattr(generations, "distill_single", spy)
    return done


def test_each_generation_learns_from_the_one_before(sentiment_csv, tiny_teacher_dir, tmp_path, runs):
    out = tmp_path / "chain"
    result = distill(chain_cfg(sentiment_csv, tiny_teacher_dir, out))
    folders = [out / f"generation-{g}" for g in (1, 2, 3)]
    assert [name for name, _ in runs] == list(map(str, folders))
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.json", *(f.name for f in folders)}
    assert yaml.safe_load((out / "config.yaml").read_text())["generations"] == 3

    teachers = [str(tiny_teacher_dir), str(folders[0] / "model"), str(folders[1] / "model")]
    for folder, teacher in zip(folders, teachers):
        assert {p.name for p in folder.iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json", "model"}
        recorded = yaml.safe_load((folder / "config.yaml").read_text())
        assert recorded["teacher"] == teacher and recorded["generations"] == 1
        assert recorded["student"]["layers"] == [1, 3]
    # from generation 2 on, the student is still copied from the original teacher; its teacher is a 2-layer student
    assert yaml.safe_load((folders[0] / "config.yaml").read_text())["student"]["model"] is None
    assert yaml.safe_load((folders[2] / "config.yaml").read_text())["student"]["model"] == str(tiny_teacher_dir)
    first_lines = [json.loads((f / "metrics.jsonl").read_text().splitlines()[0]) for f in folders]
    student_size = count_parameters(result.model)
    assert [line["teacher_parameters"] > student_size for line in first_lines] == [True, False, False]
    assert [line["teacher_parameters"] for line in first_lines[1:]] == [student_size, student_size]

    summary = json.loads((out / "metrics.json").read_text())
    final = json.loads((folders[2] / "metrics.json").read_text())
    assert summary["final"] == str(folders[2]) and result.run_dir == folders[2]
    assert summary["test_accuracy"] == final["test_accuracy"]
    assert [(row["generation"], row["run_dir"], row["teacher"]) for row in summary["generations"]] == [
        (1, str(folders[0]), teachers[0]), (2, str(folders[1]), teachers[1]), (3, str(folders[2]), teachers[2])]
    for row, folder in zip(summary["generations"], folders):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (row["validation_accuracy"], row["test_accuracy"]) == (metrics["validation_accuracy"],
                                                                      metrics["test_accuracy"])

    tokenizer = AutoTokenizer.from_pretrained(folders[0] / "model")
    trained = [logits_of(run.model, tokenizer, TEXTS) for _, run in runs]
    for folder, logits in zip(folders, trained):
        reloaded = AutoModelForSequenceClassification.from_pretrained(folder / "model")
        assert reloaded.config.num_hidden_layers == 2
        assert torch.equal(logits_of(reloaded, tokenizer, TEXTS), logits)
    assert not torch.equal(trained[0], trained[1]) and not torch.equal(trained[1], trained[2])


def test_rerun_skips_finished_generations_and_refuses_a_changed_config(sentiment_csv, tiny_teacher_dir, tmp_path,
                                                                       runs):
    out = tmp_path / "chain"
    cfg = chain_cfg(sentiment_csv, tiny_teacher_dir, out)
    distill(cfg)
    first_logits = logits_of(runs[-1][1].model, AutoTokenizer.from_pretrained(tiny_teacher_dir), TEXTS)
    kept = [out / f"generation-{g}" / name for g in (1, 2) for name in ("metrics.jsonl", "model/model.safetensors")]
    stamps = [path.stat().st_mtime_ns for path in kept]
    shutil.rmtree(out / "generation-3" / "model")
    runs.clear()
    reset_accelerate()

    result = distill(cfg)
    assert [name for name, _ in runs] == [str(out / "generation-3")]
    assert [path.stat().st_mtime_ns for path in kept] == stamps
    assert torch.equal(logits_of(result.model, AutoTokenizer.from_pretrained(tiny_teacher_dir), TEXTS), first_logits)

    runs.clear()
    reset_accelerate()
    everything_done = distill(cfg)  # nothing left to run: the final model is loaded from its folder
    assert runs == []
    assert torch.equal(logits_of(everything_done.model, AutoTokenizer.from_pretrained(tiny_teacher_dir), TEXTS),
                       first_logits)

    cfg.stages[0].learning_rate = 5e-4
    with pytest.raises(ConfigError, match="generation-1 holds a finished generation run with a different config"):
        distill(cfg, on_step=never_train)


def test_an_interrupted_generation_resumes_from_its_checkpoint(sentiment_csv, tiny_teacher_dir, tmp_path, runs):
    cfg = chain_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "chain")
    steps = []

    def kill_in_generation_2(state):  # 4 steps per generation; a checkpoint is saved every 3
        steps.append(state.global_step)
        if len(steps) == 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(cfg, on_step=kill_in_generation_2)
    assert json.loads((tmp_path / "chain" / "generation-2" / "checkpoint" / "trainer_state.json").read_text())[
        "global_step"] == 3
    reset_accelerate()
    steps.clear()
    distill(cfg, on_step=lambda state: steps.append(state.global_step))
    assert steps == [4, 1, 2, 3, 4]  # the rest of generation 2, then generation 3
    assert [name for name, _ in runs] == [str(tmp_path / "chain" / f"generation-{g}") for g in (1, 2, 3)]
    assert not (tmp_path / "chain" / "generation-2" / "checkpoint").exists()


def test_chain_settings_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="generations must be at least 1; got 0"):
        distill(DistillConfig(generations=0, teacher=str(tmp_path / "missing")), on_step=never_train)
    explicit = DistillConfig(generations=2, teacher=str(tmp_path / "missing"),
                             layer_map=LayerMapConfig(kind="explicit", layers=[1, 3]))
    with pytest.raises(ConfigError, match="layer_map.kind 'explicit' names layers of the original teacher"):
        distill(explicit, on_step=never_train)


def test_later_generations_learn_from_the_previous_model_alone():
    cfg = DistillConfig(teacher="runs/teacher/model", extra_teachers=["runs/t1/model"], teacher_weights=[2, 1],
                        output_dir="runs/chain", generations=3)
    first, third = generations.generation_config(cfg, 1), generations.generation_config(cfg, 3)
    assert (first.output_dir, first.teacher, first.extra_teachers, first.teacher_weights, first.student.model) == (
        "runs/chain/generation-1", "runs/teacher/model", ["runs/t1/model"], [2, 1], None)
    assert (third.output_dir, third.teacher, third.extra_teachers, third.teacher_weights, third.student.model) == (
        "runs/chain/generation-3", "runs/chain/generation-2/model", [], None, "runs/teacher/model")
    assert first.generations == third.generations == 1 and cfg.generations == 3


def test_born_again_recipe_passes_the_config_checks():
    cfg = parse_args(DistillConfig, ["--config", str(Path(__file__).parents[2] / "recipes" /
                                                     "distill_born_again.yaml")])
    generations.check_generations(cfg)
    assert (cfg.generations, cfg.student.layers, cfg.stages[0].epochs) == (2, [1, 3, 5], 3.0)
