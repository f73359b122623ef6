"""The classifier distillation job: its one config check, and the choice of method one level above the methods:
born-again generations (`generations` > 1), mutual learning (`mutual.peers`), or one student from one teacher or
several (`single`, `multi_teacher`)."""
from __future__ import annotations

import distill.losses  # noqa: F401  (registers the losses a stage names)
from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import check_stages
from distill.core.mapping import check_layer_map_config
from distill.core.run import TEACHER_OPTIONS, OnStep, RunResult, check_train
from distill.core.student import check_student_config
from distill.encoder.augment import check_augment
from distill.encoder.born_again import born_again, check_generations
from distill.encoder.config import DistillConfig
from distill.encoder.multi_teacher import normalised_teacher_weights
from distill.encoder.mutual import distill_mutual
from distill.encoder.single import distill_single
from distill.encoder.teacher_logits import check_logit_cache
from distill.encoder.transfer import check_transfer


def check_distill(cfg: DistillConfig) -> None:
    """Every config-only check of a distillation, whichever method it runs."""
    check_generations(cfg)
    check_stages(cfg.stages, peers=len(cfg.mutual.peers))
    check_train(cfg.train, teacher_options=TEACHER_OPTIONS, stages=len(cfg.stages))
    check_logit_cache(cfg)
    normalised_teacher_weights(cfg)
    check_layer_map_config(cfg.layer_map)
    check_transfer(cfg.transfer)
    check_augment(cfg.augment)
    if cfg.augment.copies and cfg.data.text_pair_column:
        raise ConfigError("augment works on single texts; data.text_pair_column is set (a sentence-pair task)")
    for where, student in [("student", cfg.student), *((f"mutual.peers[{i}]", peer)
                                                        for i, peer in enumerate(cfg.mutual.peers))]:
        check_student(student, where)


def check_student(student: StudentConfig, where: str) -> None:
    try:
        check_student_config(student)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


def distill(cfg: DistillConfig, on_step: OnStep = None) -> RunResult:
    check_distill(cfg)
    if cfg.generations != 1:
        return born_again(cfg, on_step)
    if cfg.mutual.peers:
        return distill_mutual(cfg, on_step)
    return distill_single(cfg, on_step)


def summary(cfg: DistillConfig, result: RunResult) -> dict:
    return {"student": str(result.run_dir / "model"), **result.metrics}


DISTILL = register_job(Job("distill", DistillConfig, check_distill, distill, summary))
