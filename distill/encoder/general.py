"""General distillation (`GeneralDistillConfig`): a small encoder, usually fresh and narrow, learns a base encoder's
hidden states and attention maps on unlabelled text, with no task and no labels (TinyBERT's general phase). Its
output is an encoder without a task head that a classifier distillation then starts from (`student.init:
pretrained`, `student.model: <output_dir>/model`), the new head learned there.

The validation metric, `validation_attention_kl` (lower is better), is the KL divergence from the teacher's
last-layer attention distributions to the student's, each averaged over its heads, so that it needs no learned
projection and compares students of any width and head count."""
from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModel, DataCollatorWithPadding, PreTrainedModel

import distill.losses  # noqa: F401  (registers the losses a stage names)
from distill.core.errors import ConfigError
from distill.core.evaluate import ValidationMetric, count_parameters
from distill.core.io import save_model
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import LossSetup, check_stages, model_inputs
from distill.core.mapping import build_layer_map, check_layer_map_config
from distill.core.models import load_tokenizer, resolve_model
from distill.core.run import TEACHER_OPTIONS, OnStep, RunResult, check_train, end_run, start_run
from distill.core.student import build_student, check_student_config
from distill.core.trainer import Trainer
from distill.encoder.config import GeneralDistillConfig
from distill.encoder.transfer import check_text_set, text_set, unlabelled_split
from distill.losses.attention import attention_kl

GENERAL_LOSSES = ("hidden_mse", "hidden_cosine", "attention_mse", "attention_kl", "similarity", "rkd_distance",
                  "rkd_angle")
"""Losses that read only hidden states or attention maps: a base encoder has no logits to learn."""


def check_general(cfg: GeneralDistillConfig) -> None:
    check_stages(cfg.stages)
    check_train(cfg.train, teacher_options=TEACHER_OPTIONS)
    if cfg.train.cache_teacher_logits:
        raise ConfigError("train.cache_teacher_logits: a base encoder has no logits; general distillation reads its "
                          "hidden states and attention maps as it runs")
    check_student_config(cfg.student)
    check_layer_map_config(cfg.layer_map)
    check_text_set(cfg.corpus, "corpus")
    for i, stage in enumerate(cfg.stages):
        for loss in stage.losses:
            if loss.name not in GENERAL_LOSSES:
                raise ConfigError(f"stages[{i}]: loss '{loss.name}' needs logits or labels; general distillation "
                                  f"takes {', '.join(GENERAL_LOSSES)}")
    if cfg.validation_examples < 1:
        raise ConfigError(f"validation_examples must be at least 1; got {cfg.validation_examples}")
    if cfg.max_length < 2:
        raise ConfigError(f"max_length must be at least 2; got {cfg.max_length}")


def general_distill(cfg: GeneralDistillConfig, on_step: OnStep = None) -> RunResult:
    check_general(cfg)
    accelerator, run_dir = start_run(cfg)
    tokenizer = load_tokenizer(cfg.teacher)
    teacher = AutoModel.from_pretrained(resolve_model(cfg.teacher), attn_implementation="eager")
    student = build_student(cfg.student, teacher)
    student.set_attn_implementation("eager")
    teacher.to(getattr(torch, cfg.train.teacher_dtype))  # built from the float32 teacher: the student stays float32
    texts = text_set(cfg.corpus, "corpus")
    if len(texts) <= cfg.validation_examples:
        raise ConfigError(f"corpus has {len(texts)} examples, not more than validation_examples="
                          f"{cfg.validation_examples}")
    held_out = len(texts) - cfg.validation_examples
    splits = {"train": unlabelled_split(texts[:held_out], tokenizer, cfg.max_length),
              "validation": unlabelled_split(texts[held_out:], tokenizer, cfg.max_length)}
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    metric = attention_kl_metric(teacher)
    trainer = Trainer(accelerator, student, teacher, splits, collate, cfg.train, cfg.seed, run_dir, on_step, metric)
    trainer.log({"student_parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher),
                 "train_examples": held_out})
    layer_map = build_layer_map(cfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    student = trainer.fit(cfg.stages, LossSetup(student.config, teacher.config, layer_map))
    metrics = {"validation_attention_kl": metric.compute(student, trainer.eval_loader, accelerator),
               "parameters": count_parameters(student), "train_examples": held_out,
               "validation_examples": cfg.validation_examples}
    if accelerator.is_main_process:
        save_model(student, tokenizer, run_dir / "model")
    end_run(accelerator, run_dir, metrics)
    return RunResult(student, metrics, run_dir)


def attention_kl_metric(teacher: PreTrainedModel) -> ValidationMetric:
    @torch.no_grad()
    def compute(student: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
        was_training = student.training
        student.eval()
        total = count = 0.0
        for batch in loader:
            inputs = model_inputs(batch)
            mask = inputs["attention_mask"].float()
            target = teacher(**inputs, output_attentions=True).attentions[-1].mean(1, keepdim=True)
            learned = student(**inputs, output_attentions=True).attentions[-1].mean(1, keepdim=True)
            summed = attention_kl(learned, target, mask) * mask.sum()  # the batch's mean over its real tokens, summed
            total_kl, tokens = accelerator.gather_for_metrics((summed.reshape(1), mask.sum().reshape(1)))
            total, count = total + total_kl.sum().item(), count + tokens.sum().item()
        student.train(was_training)
        return total / max(count, 1.0)

    return ValidationMetric("attention_kl", compute, higher_is_better=False)


def summary(cfg: GeneralDistillConfig, result: RunResult) -> dict:
    return {"student": str(result.run_dir / "model"), **result.metrics}


GENERAL_DISTILL = register_job(Job("general_distill", GeneralDistillConfig, check_general, general_distill, summary))
