"""The lifecycle every training job shares: check the training settings, start a run (Accelerator, seed, the
resolved config recorded), load a classification task, and finish (evaluate validation and test, save the model
atomically, write metrics.json, remove the resume state). Jobs that do not train (pruning a causal LM, quantization,
exports) start with `open_run`: the same record of the config, the same refusal of another config's unfinished run.

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl` (progress), `model/` (save_pretrained +
tokenizer) and `metrics.json` (final numbers)."""
from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import datasets
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, LoggerType, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from distill.core.config import DataConfig, TrainConfig, config_yaml, flat_dict, to_dict
from distill.core.data import collator, label_names, load_splits, tokenize_and_measure
from distill.core.errors import ConfigError, did_you_mean
from distill.core.evaluate import ACCURACY, ValidationMetric, count_parameters, disk_size_mb
from distill.core.io import save_model, write_json_atomic, write_text_atomic
from distill.core.models import load_tokenizer
from distill.core.sharding import SHARDINGS, TEACHER_PLACEMENTS
from distill.core.tracking import log_record
from distill.core.trainer import CHECKPOINT_DIR, TrainState, remove_resume_state

OnStep = Optional[Callable[[TrainState], None]]
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
TEACHER_OPTIONS = ("teacher_dtype", "cache_teacher_logits")
TRUNCATION_WARNING = 0.05
"""Share of a split's examples cut at max_length above which a run warns."""

logger = logging.getLogger(__name__)


class RunConfig(Protocol):
    """What every training job's config has: where it writes, its seed, and its training settings."""
    output_dir: str
    seed: int
    train: TrainConfig


@dataclass
class RunResult:
    model: PreTrainedModel
    metrics: dict
    run_dir: Path


@dataclass
class Task:
    """Tokenized splits (train, validation, test), the label names (none for causal LMs), the collator that pads
    them, and how much `max_length` cut of each split (`truncation_stats`)."""
    tokenizer: PreTrainedTokenizerBase
    splits: datasets.DatasetDict
    labels: list[str]
    collate: Callable = None
    truncation: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.collate is None:
            self.collate = collator(self.tokenizer)


# ----- checks, before anything loads ------------------------------------------------------------------------------
def check_train(train: TrainConfig, teacher_options: Sequence[str] = (), stages: int = 1) -> None:
    """Config-only checks of `train`. `teacher_options`: which of `teacher_dtype` and `cache_teacher_logits` the job
    reads (classifier distillation both, causal-LM distillation the dtype); it refuses the others away from their
    defaults. `stages`: how many the run trains."""
    if train.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got "
                          f"'{train.mixed_precision}'")
    for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_steps", "save_steps"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1; got {getattr(train, name)}")
    if train.teacher_dtype not in TEACHER_DTYPES:
        raise ConfigError(f"train.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}; got "
                          f"'{train.teacher_dtype}'")
    if train.sharding not in SHARDINGS:
        raise ConfigError(f"train.sharding must be one of {', '.join(SHARDINGS)}; got '{train.sharding}'")
    if train.teacher_placement not in TEACHER_PLACEMENTS:
        raise ConfigError(f"train.teacher_placement must be one of {', '.join(TEACHER_PLACEMENTS)}; got "
                          f"'{train.teacher_placement}'")
    if train.teacher_placement == "shard" and train.sharding != "fsdp2":
        raise ConfigError("train.teacher_placement: shard needs train.sharding: fsdp2")
    if train.sharding == "fsdp2" and stages > 1:
        raise ConfigError(f"train.sharding: fsdp2 trains one stage; this run has {stages}")
    if train.sharding == "fsdp2" and train.mixed_precision == "fp16":
        raise ConfigError("train.sharding: fsdp2 with train.mixed_precision: fp16 would need a sharded gradient "
                          "scaler; use bf16")
    changed = [f"train.{key}" for key, default in (("teacher_dtype", "float32"), ("cache_teacher_logits", False))
               if getattr(train, key) != default and key not in teacher_options]
    if changed:
        raise ConfigError(f"{' and '.join(changed)}: this job does not read it (classifier distillation, "
                          "recipes/distill_student.py, does); leave it at its default")
    check_trackers(train.report_to)


def check_trackers(names: list[str]) -> None:
    """Config-only check of `train.report_to`: trackers Accelerate knows, whose packages are installed."""
    known = [kind.value for kind in LoggerType if kind != LoggerType.ALL]
    available = {str(kind) for kind in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"train.report_to: unknown tracker '{name}'; {did_you_mean(name, known)}")
        if name not in available:
            raise ConfigError(
                f"train.report_to: tracker '{name}' needs its package: pip install {name.replace('_', '-')}"
            )


def check_launch(accelerator: Accelerator, train: TrainConfig) -> None:
    """Refuse launches that would shard models where this trainer cannot, override the run's accumulation, or run
    copies of one job.

    Teachers (and the models that runs evaluate and save) are plain modules outside `prepare`. DeepSpeed ZeRO-3 keeps
    every weight partitioned outside the forward of the module that owns it, where the fused causal losses read the LM
    heads, and it cannot run without GPUs here to be tested: refused. Accelerate's FSDP plugin shards only the one
    model `prepare` sees: refused for `train.sharding: fsdp2` (distill.core.sharding), which shards the student and,
    if asked, the teacher. And a launcher may start processes that Accelerate does not join (on a machine without
    GPUs, a multi-GPU config without ACCELERATE_USE_CPU=1): each would train alone and write the same output_dir."""
    if is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError("DeepSpeed ZeRO-3 (zero_stage: 3) is not supported: use a multi-process launch with "
                          "train.sharding: fsdp2, which shards weights, gradients and optimizer state alike")
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ConfigError("Accelerate's FSDP launch (distributed_type: FSDP) is not supported: launch with "
                          "recipes/accelerate/multi_gpu.yaml (or cpu_2proc.yaml) and set train.sharding: fsdp2")
    if train.sharding == "fsdp2" and accelerator.num_processes < 2:
        raise ConfigError("train.sharding: fsdp2 splits the student over the processes of a launch; this one has a "
                          "single process: launch several (recipes/accelerate/multi_gpu.yaml, or cpu_2proc.yaml "
                          "without GPUs)")
    if train.sharding == "fsdp2" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("train.sharding: fsdp2 under a DeepSpeed launch would shard twice: launch with "
                          "recipes/accelerate/multi_gpu.yaml")
    if accelerator.gradient_accumulation_steps != train.gradient_accumulation_steps:
        raise ConfigError(
            f"the launch sets gradient_accumulation_steps {accelerator.gradient_accumulation_steps} (Accelerate or "
            f"DeepSpeed config), train.gradient_accumulation_steps is {train.gradient_accumulation_steps}: "
            "make them equal"
        )
    check_joined(accelerator.num_processes)


def check_joined(joined: int) -> None:
    """Refuse a launch whose processes Accelerate did not join: each would run alone and write the same output."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != joined:
        raise ConfigError(
            f"the launcher started {launched} processes but Accelerate joined {joined}: "
            "without GPUs, launch with ACCELERATE_USE_CPU=1 (see recipes/accelerate/cpu_2proc.yaml)"
        )


def joined_processes() -> PartialState:
    """The processes of this launch (one without a launcher) for jobs that do not train: CPU processes are joined as
    an Accelerator joins them (ACCELERATE_USE_CPU=1); a launch they do not form is refused."""
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_joined(processes.num_processes)
    return processes


@contextmanager
def launch_teardown():
    """Where every process of a launch ends, once, after all the jobs it ran (a pipeline's stages, a born-again
    chain's generations): the processes wait for each other, then release the process group while the interpreter is
    whole. A process group left to interpreter exit is torn down with its gloo threads still holding work, and the
    process aborts ("terminate called without an active exception") after its outputs are written.

    A process that fails leaves at once, with no collective that its peers would never join; it releases its own end
    so that it exits with its error's status, and the launcher stops the others."""
    try:
        yield
    except BaseException:
        release_process_group(wait=False)
        raise
    release_process_group(wait=True)


def release_process_group(wait: bool) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait:
        torch.distributed.barrier()
    gc.collect()  # sharded models left in reference cycles hold the group through their device mesh
    torch.distributed.destroy_process_group()


def check_class_count(num_labels: int, labels: list[str], who: str = "model") -> None:
    """A classifier must predict as many classes as the data has."""
    if num_labels != len(labels):
        raise ConfigError(f"{who} predicts {num_labels} classes, the data has {len(labels)}")


# ----- start ------------------------------------------------------------------------------------------------------
def new_accelerator(**settings) -> Accelerator:
    """An Accelerator of these settings alone. A pipeline's earlier stage in this process left its own (mixed
    precision, device) in accelerate's process-wide state, which would be kept or refuse these; the processes
    themselves (PartialState) are kept."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(**settings)


def start_run(cfg: RunConfig) -> tuple[Accelerator, Path]:
    """Create the Accelerator (with the configured trackers), seed everything, and record the resolved config in
    `output_dir`. A folder holding an unfinished run (its checkpoint) of another config is refused."""
    run_dir = Path(cfg.output_dir)
    refuse_other_config(cfg, unfinished=(run_dir / CHECKPOINT_DIR).exists())
    accelerator = new_accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.report_to or None, project_dir=cfg.train.tracking_dir or str(run_dir / "tracking"),
    )
    check_launch(accelerator, cfg.train)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        record_config(cfg)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(run_dir.name, config=flat_dict(to_dict(cfg)))
    return accelerator, run_dir


def open_run(cfg) -> Path:
    """The start of a job that does not train (one process, no Accelerator of its own): record the resolved config in
    `output_dir`. Such a job writes metrics.json last, so a folder whose config.yaml has no metrics.json beside it
    holds an unfinished run; one of another config is refused."""
    run_dir = Path(cfg.output_dir)
    refuse_other_config(cfg, unfinished=not (run_dir / "metrics.json").is_file())
    record_config(cfg)
    return run_dir


def continues(cfg) -> bool:
    """Whether `output_dir` holds a run of this very config (finished or not), whose outputs a rerun may keep; call it
    before `open_run` records the new config."""
    recorded = Path(cfg.output_dir) / "config.yaml"
    return recorded.is_file() and same_config(recorded, cfg)


def refuse_other_config(cfg, unfinished: bool) -> None:
    """A rerun continues what an unfinished run left (its checkpoint, its files), so it must be that run's config."""
    recorded = Path(cfg.output_dir) / "config.yaml"
    if unfinished and recorded.is_file() and not continues(cfg):
        raise ConfigError(
            f"{recorded.parent} holds an unfinished run with a different config ({recorded}); resume it with that "
            "config, or choose another output_dir"
        )


def record_config(cfg) -> None:
    """`output_dir/config.yaml`, the resolved config, written whole or not at all."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml(cfg))


def same_config(recorded: Path, cfg) -> bool:
    """Whether the config.yaml a run wrote holds `cfg`'s values (key order aside, so that folders written before a
    field moved still match)."""
    return yaml.safe_load(recorded.read_text()) == yaml.safe_load(config_yaml(cfg))


def load_task(data_cfg: DataConfig, model_name: str) -> Task:
    tokenizer = load_tokenizer(model_name)
    raw = load_splits(data_cfg)
    splits, truncation = tokenize_and_measure(raw, tokenizer, data_cfg.max_length)
    warn_truncation(truncation, data_cfg.max_length)
    return Task(tokenizer, splits, label_names(raw), truncation=truncation)


def warn_truncation(truncation: dict, max_length: int, key: str = "data.max_length") -> None:
    """Once per run: which splits lose more than `TRUNCATION_WARNING` of their examples' ends at `max_length`."""
    cut = {split: shares for split, shares in truncation.items() if shares["examples"] > TRUNCATION_WARNING}
    if cut:
        parts = ", ".join(f"{split} {shares['examples']:.0%} of examples ({shares['tokens']:.0%} of tokens)"
                          for split, shares in cut.items())
        logger.warning("%s=%d cuts %s; raise it to keep more of each text", key, max_length, parts)


# ----- finish -----------------------------------------------------------------------------------------------------
def evaluation_loader(accelerator: Accelerator, dataset: datasets.Dataset, collate: Callable, batch_size: int
                      ) -> DataLoader:
    return accelerator.prepare(DataLoader(dataset, batch_size, collate_fn=collate))


def measure_and_save(accelerator: Accelerator, model: PreTrainedModel, task: Task, batch_size: int, folder: Path,
                     metric: ValidationMetric = ACCURACY, files: Optional[dict[str, str | bytes]] = None,
                     save: Optional[Callable] = None) -> dict:
    """Validation and test values of `metric` (accuracy, perplexity) and parameters of `model`; the main process saves
    it with `files` (with `save`, default `save_model`) and adds its size on disk."""
    metrics = {f"{split}_{metric.name}": metric.compute(
        model, evaluation_loader(accelerator, task.splits[split], task.collate, batch_size), accelerator)
        for split in ("validation", "test")}
    metrics["parameters"] = count_parameters(model)
    if accelerator.is_main_process:
        (save or save_model)(model, task.tokenizer, folder, files)
        metrics["disk_mb"] = disk_size_mb(folder)
    return metrics


def finish_run(accelerator: Accelerator, run_dir: Path, model: PreTrainedModel, task: Task, batch_size: int,
               metric: ValidationMetric = ACCURACY, files: Optional[dict[str, str | bytes]] = None,
               extra: Optional[dict] = None, save: Optional[Callable] = None) -> RunResult:
    """Evaluate on validation and test, save model + tokenizer (+ `files`, such as early-exit heads) atomically, write
    metrics.json (with `extra` metrics and the task's truncation shares), then remove the resume state."""
    metrics = {
        **measure_and_save(accelerator, model, task, batch_size, run_dir / "model", metric, files, save),
        "test_examples": len(task.splits["test"]),
        **({"truncation": task.truncation} if task.truncation else {}),
        **(extra or {}),
    }
    end_run(accelerator, run_dir, metrics)
    return RunResult(model, metrics, run_dir)


def end_run(accelerator: Accelerator, run_dir: Path, metrics: dict) -> None:
    """Write metrics.json and log it, then (all outputs written) remove the resume state and close the trackers. The
    process group stays for the jobs after this one; `launch_teardown` releases it."""
    if accelerator.is_main_process:
        write_json_atomic(metrics, run_dir / "metrics.json")
    log_record(accelerator, run_dir, {"final": metrics})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_resume_state(run_dir)
    for tracker in accelerator.trackers:
        tracker.finish()
