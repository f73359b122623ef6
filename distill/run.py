"""The two jobs a recipe runs, step by step: fine-tune a teacher, and distil it into a student.

Every check that can fail does so before training starts; outputs land in `output_dir`:
`config.yaml` (resolved config), `metrics.jsonl` (progress), `model/` (save_pretrained + tokenizer, written
atomically) and `metrics.json` (final numbers)."""
from __future__ import annotations

import difflib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, set_seed
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

from .config import (ConfigError, DistillConfig, FinetuneConfig, StageConfig, StudentConfig, TrainConfig,
                     config_yaml, flat_dict, to_dict)
from .ensemble import add_extra_teachers, normalised_teacher_weights
from .evaluate import count_parameters, disk_size_mb
from .losses import LOSSES, LossSetup, check_loss
from .mapping import build_layer_map
from .sources import (collator, label_names, load_classifier, load_splits, load_tokenizer, tokenize,
                      vocabulary_difference)
from .student import build_student
from .teacher_outputs import (check_logit_cache, check_teacher_dtype, reduce_teacher_precision,
                              with_cached_logits)
from .trainer import Trainer, TrainState

OnStep = Optional[Callable[[TrainState], None]]


@dataclass
class RunResult:
    model: PreTrainedModel
    metrics: dict
    run_dir: Path


@dataclass
class Task:
    tokenizer: PreTrainedTokenizerBase
    splits: datasets.DatasetDict
    labels: list[str]


def finetune(cfg: FinetuneConfig, on_step: OnStep = None) -> RunResult:
    """Fine-tune `cfg.model` on the task (adding a fresh classification head if it has none)."""
    check_stages([cfg.stage])
    accelerator, run_dir = start_run(cfg)
    task = load_task(cfg.data, cfg.model)
    model = load_classifier(
        cfg.model, num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)), label2id={name: i for i, name in enumerate(task.labels)},
    )
    trainer = Trainer(accelerator, model, None, task.splits, collator(task.tokenizer), cfg.train, cfg.seed,
                      run_dir, on_step)
    model = trainer.fit([cfg.stage], LossSetup(model.config, None, None))
    return finish_run(trainer, model, task, run_dir)


def distill(cfg: DistillConfig, on_step: OnStep = None) -> RunResult:
    """Build the student from the teacher, then run each configured stage against the teacher (or teachers).
    With `generations` other than 1, a chain of born-again generations instead (`distill.generations`); with
    `mutual.peers`, the student and its peers trained together (`distill.mutual`)."""
    if cfg.generations != 1:
        from .generations import born_again  # born_again calls distill() once per generation

        return born_again(cfg, on_step)
    if cfg.mutual.peers:
        from .mutual import distill_mutual  # distill_mutual builds on this module's steps

        return distill_mutual(cfg, on_step)
    check_stages(cfg.stages)
    check_logit_cache(cfg)
    weights = normalised_teacher_weights(cfg)
    accelerator, run_dir = start_run(cfg)
    task = load_task(cfg.data, cfg.teacher)
    teacher = load_teacher(cfg, task)
    student, setup = build_distill_student(cfg, cfg.student, teacher, task)
    teachers = add_extra_teachers(teacher, cfg.extra_teachers, weights, task.tokenizer)
    live_teacher, splits, collate, about_teacher = teacher_for_training(cfg, teachers, task, accelerator)
    trainer = Trainer(accelerator, student, live_teacher, splits, collate, cfg.train, cfg.seed, run_dir, on_step)
    trainer.log({"student_parameters": count_parameters(student), "layer_map": setup.layer_map.hidden,
                 **about_teacher})
    student = trainer.fit(cfg.stages, setup)
    student.set_attn_implementation("sdpa")
    return finish_run(trainer, student, task, run_dir)


def teacher_for_training(cfg: DistillConfig, teachers: nn.Module, task: Task, accelerator: Accelerator
                         ) -> tuple[Optional[nn.Module], datasets.DatasetDict, Callable, dict]:
    """The teacher as training runs it, in `train.teacher_dtype` (None with `train.cache_teacher_logits`: the
    collator then carries its logits), the splits and collator to train on, and what to log about the teacher."""
    teachers.to(accelerator.device)
    splits, collate, batch_size = task.splits, collator(task.tokenizer), cfg.train.eval_batch_size
    about = {"teacher_parameters": count_parameters(teachers)}
    drift = reduce_teacher_precision(teachers, cfg.train.teacher_dtype, splits["validation"], collate, batch_size,
                                     accelerator.device)
    if drift:
        about["teacher_dtype_drift"] = drift
    if not cfg.train.cache_teacher_logits:
        return teachers, splits, collate, about
    splits, collate = with_cached_logits(teachers, splits, collate, batch_size, accelerator.device)
    return None, splits, collate, about


def load_teacher(cfg: DistillConfig, task: Task) -> PreTrainedModel:
    teacher = load_classifier(cfg.teacher, attn_implementation=attention_implementation(cfg.stages))
    if teacher.config.num_labels != len(task.labels):
        raise ConfigError(f"teacher predicts {teacher.config.num_labels} classes, the data has {len(task.labels)}")
    return teacher


def build_distill_student(cfg: DistillConfig, student_cfg: StudentConfig, teacher: PreTrainedModel, task: Task
                          ) -> tuple[PreTrainedModel, LossSetup]:
    """A student built as `student_cfg` says, and what its losses need to know."""
    student = build_student(student_cfg, teacher)
    student.set_attn_implementation(attention_implementation(cfg.stages))
    if student_cfg.model:
        check_same_vocabulary(load_tokenizer(student_cfg.model), task.tokenizer)
    layer_map = build_layer_map(cfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return student, LossSetup(student.config, teacher.config, layer_map)


def attention_implementation(stages: list[StageConfig]) -> str:
    """`eager` when a loss reads attention maps (with SDPA, transformers 5 returns none), else `sdpa`."""
    needs_attentions = any(LOSSES[loss.name].needs_attentions for stage in stages for loss in stage.losses)
    return "eager" if needs_attentions else "sdpa"


def check_stages(stages: list[StageConfig], peers: int = 0) -> None:
    """Config-only checks, before anything is loaded. `peers`: how many students train beside each one (mutual
    learning); losses between peers need some, and peers need such a loss."""
    if not stages:
        raise ConfigError("at least one stage is needed")
    for i, stage in enumerate(stages):
        if stage.epochs <= 0 or stage.learning_rate <= 0:
            raise ConfigError(f"stages[{i}] ('{stage.name}'): epochs and learning_rate must be positive")
        if not stage.losses:
            raise ConfigError(f"stages[{i}] ('{stage.name}') lists no losses")
        for loss in stage.losses:
            if check_loss(loss, where=f"stages[{i}]: ").needs_peers and not peers:
                raise ConfigError(f"stages[{i}]: loss '{loss.name}' needs peer students; list them in mutual.peers")
    if peers and not any(LOSSES[loss.name].needs_peers for stage in stages for loss in stage.losses):
        raise ConfigError(
            f"mutual.peers lists {peers} student(s) but no stage has the 'peer_kl' loss: the students would not "
            "learn from each other"
        )


def check_same_vocabulary(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase):
    differ = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if differ:
        raise ConfigError(
            f"student and teacher tokenizers differ ({differ}): logit and hidden-state distillation need the same "
            "token ids"
        )


def start_run(cfg: FinetuneConfig | DistillConfig) -> tuple[Accelerator, Path]:
    """Create the Accelerator (with the configured trackers), seed everything, and record the resolved config in
    `output_dir`."""
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16; got '{cfg.train.mixed_precision}'")
    check_teacher_options(cfg)
    check_trackers(cfg.train.report_to)
    run_dir = Path(cfg.output_dir)
    config_text = config_yaml(cfg)
    recorded = run_dir / "config.yaml"
    if (run_dir / "checkpoint").exists() and recorded.is_file() and recorded.read_text() != config_text:
        raise ConfigError(
            f"{run_dir} holds an unfinished run with a different config ({recorded}); resume it with that config, "
            "or choose another output_dir"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.report_to or None, project_dir=cfg.train.tracking_dir or str(run_dir / "tracking"),
    )
    check_launch(accelerator, cfg.train)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(config_text)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(run_dir.name, config=flat_dict(to_dict(cfg)))
    return accelerator, run_dir


def check_teacher_options(cfg) -> None:
    """`train.teacher_dtype` names a dtype; it and `train.cache_teacher_logits` serve classifier distillation only."""
    check_teacher_dtype(cfg.train.teacher_dtype)
    changed = [f"train.{key}" for key, default in (("teacher_dtype", "float32"), ("cache_teacher_logits", False))
               if getattr(cfg.train, key) != default]
    if changed and not isinstance(cfg, DistillConfig):
        raise ConfigError(f"{' and '.join(changed)}: only classifier distillation (recipes/distill_student.py) "
                          "supports this; leave it at its default")


def check_trackers(names: list[str]) -> None:
    """Config-only check of `train.report_to`: trackers Accelerate knows, whose packages are installed."""
    known = [kind.value for kind in LoggerType if kind != LoggerType.ALL]
    available = {str(kind) for kind in get_available_trackers()}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise ConfigError(f"train.report_to: unknown tracker '{name}'; {hint}")
        if name not in available:
            raise ConfigError(
                f"train.report_to: tracker '{name}' needs its package: pip install {name.replace('_', '-')}"
            )


def check_launch(accelerator: Accelerator, train: TrainConfig) -> None:
    """Refuse launches that would load the teacher wrongly, override the run's accumulation, or run copies of one job.

    Teachers (and the models that runs evaluate and save) are plain modules outside `prepare`, a full copy in each
    process. Under DeepSpeed ZeRO-3 with `zero3_init_flag`, or FSDP with `fsdp_cpu_ram_efficient_loading`,
    transformers loads every model partitioned or empty outside the main process, expecting `prepare` to fill it.
    And a launcher may start processes that Accelerate does not join (on a machine without GPUs, a multi-GPU
    config without ACCELERATE_USE_CPU=1): each would train alone and write the same output_dir."""
    if is_deepspeed_zero3_enabled():
        raise ConfigError("DeepSpeed ZeRO-3 with zero3_init_flag: true would load the teacher partitioned; set "
                          "zero3_init_flag: false in the Accelerate config")
    if is_fsdp_enabled():
        raise ConfigError("FSDP with fsdp_cpu_ram_efficient_loading: true would load the teacher empty outside the "
                          "main process; set it to false in the Accelerate config (see recipes/accelerate/fsdp.yaml)")
    if accelerator.gradient_accumulation_steps != train.gradient_accumulation_steps:
        raise ConfigError(
            f"the launch sets gradient_accumulation_steps {accelerator.gradient_accumulation_steps} (Accelerate or "
            f"DeepSpeed config), train.gradient_accumulation_steps is {train.gradient_accumulation_steps}: "
            "make them equal"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes but Accelerate joined {accelerator.num_processes}: "
            "without GPUs, launch with ACCELERATE_USE_CPU=1 (see recipes/accelerate/cpu_2proc.yaml)"
        )


def load_task(data_cfg, model_name: str) -> Task:
    tokenizer = load_tokenizer(model_name)
    raw = load_splits(data_cfg)
    labels = label_names(raw)
    return Task(tokenizer, tokenize(raw, tokenizer, data_cfg.max_length), labels)


def finish_run(trainer: Trainer, model: PreTrainedModel, task: Task, run_dir: Path, extra: Optional[dict] = None,
               save: Callable = None) -> RunResult:
    """Evaluate on validation and test, save model + tokenizer atomically (with `save`, default `save_model`), with
    the files the last stage's losses add (early-exit heads), write metrics.json (with `extra` metrics added)."""
    acc = trainer.accelerator
    metrics = {
        **measure_and_save(trainer, model, task, run_dir / "model", trainer.saved_files(), save),
        "test_examples": len(task.splits["test"]),
        **(extra or {}),
    }
    if acc.is_main_process:
        write_json_atomic(metrics, run_dir / "metrics.json")
        trainer.log({"final": metrics})
    acc.wait_for_everyone()
    trainer.cleanup()
    acc.end_training()
    return RunResult(model, metrics, run_dir)


def measure_and_save(trainer: Trainer, model: PreTrainedModel, task: Task, folder: Path,
                     files: dict[str, str | bytes], save: Optional[Callable] = None) -> dict:
    """Validation and test values of the trainer's metric (accuracy, perplexity) and parameters of `model`; the main
    process saves it with `files` (with `save`, default `save_model`) and adds its size on disk."""
    acc, metric = trainer.accelerator, trainer.metric
    metrics = {
        f"validation_{metric.name}": metric.compute(model, trainer.eval_loader, acc),
        f"test_{metric.name}": metric.compute(model, trainer.eval_loader_for(task.splits["test"]), acc),
        "parameters": count_parameters(model),
    }
    if acc.is_main_process:
        (save or save_model)(model, task.tokenizer, folder, files)
        metrics["disk_mb"] = disk_size_mb(folder)
    return metrics


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
               extra_files: Optional[dict[str, str | bytes]] = None) -> None:
    """save_pretrained into a sibling temp folder, then rename: the folder appears only when complete.
    `extra_files` (name -> text or bytes) are written into it first."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, data in (extra_files or {}).items():
        if isinstance(data, bytes):
            (tmp / name).write_bytes(data)
        else:
            (tmp / name).write_text(data)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_json_atomic(values: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    os.replace(tmp, path)
