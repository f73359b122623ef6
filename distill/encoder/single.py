"""Distillation from one teacher (or an ensemble of teachers of one task, `multi_teacher`) into one student, stage
after stage, and the steps that mutual learning shares: loading the teacher, building a student with what its losses
need, and preparing the teacher as training runs it (reduced precision, or its logits cached)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel

from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.evaluate import count_parameters
from distill.core.loss_interface import LossSetup, attention_implementation
from distill.core.mapping import build_layer_map
from distill.core.models import load_classifier, load_tokenizer, vocabulary_difference
from distill.core.run import OnStep, RunResult, Task, check_class_count, finish_run, load_task, start_run
from distill.core.student import build_student
from distill.core.trainer import Trainer
from distill.encoder.config import DistillConfig
from distill.encoder.multi_teacher import add_extra_teachers, normalised_teacher_weights
from distill.encoder.teacher_logits import reduce_teacher_precision, with_cached_logits
from distill.encoder.transfer import add_unlabelled, unlabelled_texts


@dataclass
class Prepared:
    """A started distillation run with its students built and the teacher ready as training runs it."""
    accelerator: Accelerator
    run_dir: Path
    task: Task
    students: list[PreTrainedModel]
    setups: list[LossSetup]
    teacher: Optional[nn.Module]
    """None with `train.cache_teacher_logits`: the collator carries its logits."""
    splits: datasets.DatasetDict
    collate: Callable
    about_teacher: dict


def prepare(cfg: DistillConfig, student_cfgs: list[StudentConfig]) -> Prepared:
    """Start the run, load the task and the teacher (or teachers), build one student per entry of `student_cfgs` (an
    error names the entry: `mutual.peers[i]` for the second on), and prepare the teacher for training."""
    weights = normalised_teacher_weights(cfg)
    accelerator, run_dir = start_run(cfg)
    task = load_task(cfg.data, cfg.teacher)
    teacher = load_teacher(cfg, task)
    student_task = task_of_own_vocabulary(cfg, student_cfgs, task)
    # drawn once, through the teacher's vocabulary: a student with its own reads the same texts
    texts = unlabelled_texts(cfg.data, cfg.transfer, cfg.augment, teacher, task.tokenizer)
    task = add_unlabelled(task, texts, cfg.data.max_length, cfg.transfer.with_task_data)
    if student_task is not None:
        student_task = add_unlabelled(student_task, texts, cfg.data.max_length, cfg.transfer.with_task_data)
    built = []
    for i, student_cfg in enumerate(student_cfgs):
        try:
            built.append(build_distill_student(cfg, student_cfg, teacher))
        except ConfigError as err:
            raise ConfigError(f"mutual.peers[{i - 1}]: {err}" if i else str(err)) from err
    teachers = add_extra_teachers(teacher, cfg.extra_teachers, weights, task.tokenizer)
    live_teacher, splits, collate, about_teacher = teacher_for_training(cfg, teachers, task, accelerator,
                                                                        student_task)
    return Prepared(accelerator, run_dir, student_task or task, [student for student, _ in built],
                    [setup for _, setup in built], live_teacher, splits, collate, about_teacher)


def task_of_own_vocabulary(cfg: DistillConfig, student_cfgs: list[StudentConfig], task: Task) -> Optional[Task]:
    """The task tokenized by the student's own tokenizer when it differs from the teacher's (a vocabulary-pruned
    student), else None. Only the teacher's logits can cross vocabularies, and only when they are cached: each
    example's logits come from the teacher's tokenization of its text, the student reads its own."""
    for i, student_cfg in enumerate(student_cfgs):
        if not student_cfg.model:
            continue
        differ = vocabulary_difference(load_tokenizer(student_cfg.model), task.tokenizer)
        if not differ:
            continue
        where = f"mutual.peers[{i - 1}]: " if i else ""
        if len(student_cfgs) > 1 or not cfg.train.cache_teacher_logits:
            raise ConfigError(
                f"{where}student and teacher tokenizers differ ({differ}): hidden-state and attention losses need "
                "the same token ids; with train.cache_teacher_logits: true and losses on the teacher's logits only "
                "(kl, logit_mse, ce), one student can learn across vocabularies")
        return load_task(cfg.data, student_cfg.model)
    return None


def distill_single(cfg: DistillConfig, on_step: OnStep = None) -> RunResult:
    """Build the student from the teacher, then run each configured stage against the teacher (or teachers)."""
    run = prepare(cfg, [cfg.student])
    (student,), (setup,) = run.students, run.setups
    trainer = Trainer(run.accelerator, student, run.teacher, run.splits, run.collate, cfg.train, cfg.seed,
                      run.run_dir, on_step)
    trainer.log({"student_parameters": count_parameters(student), "layer_map": setup.layer_map.hidden,
                 **run.about_teacher})
    student = trainer.fit(cfg.stages, setup)
    student.set_attn_implementation("sdpa")
    return finish_run(run.accelerator, run.run_dir, student, run.task, cfg.train.eval_batch_size,
                      files=trainer.saved_files(), extra={"memory_per_process_bytes": trainer.memory_per_process})


def teacher_for_training(cfg: DistillConfig, teachers: nn.Module, task: Task, accelerator: Accelerator,
                         student_task: Optional[Task] = None
                         ) -> tuple[Optional[nn.Module], datasets.DatasetDict, Callable, dict]:
    """The teacher as training runs it, in `train.teacher_dtype` (None with `train.cache_teacher_logits`: the
    collator then carries its logits), the splits and collator to train on (`student_task`'s, tokenized by the
    student's own vocabulary, when given), and what to log about the teacher."""
    teachers.to(accelerator.device)
    splits, collate, batch_size = task.splits, task.collate, cfg.train.eval_batch_size
    about = {"teacher_parameters": count_parameters(teachers)}
    drift = reduce_teacher_precision(teachers, cfg.train.teacher_dtype, splits["validation"], collate, batch_size,
                                     accelerator.device)
    if drift:
        about["teacher_dtype_drift"] = drift
    if not cfg.train.cache_teacher_logits:
        return teachers, splits, collate, about
    splits, collate = with_cached_logits(teachers, splits, collate, batch_size, accelerator.device, student_task)
    return None, splits, collate, about


def load_teacher(cfg: DistillConfig, task: Task) -> PreTrainedModel:
    teacher = load_classifier(cfg.teacher, attn_implementation=attention_implementation(cfg.stages))
    check_class_count(teacher.config.num_labels, task.labels, "teacher")
    return teacher


def build_distill_student(cfg: DistillConfig, student_cfg: StudentConfig, teacher: PreTrainedModel
                          ) -> tuple[PreTrainedModel, LossSetup]:
    """A student built as `student_cfg` says, and what its losses need to know."""
    student = build_student(student_cfg, teacher)
    student.set_attn_implementation(attention_implementation(cfg.stages))
    layer_map = build_layer_map(cfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return student, LossSetup(student.config, teacher.config, layer_map)
