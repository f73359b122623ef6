"""A job is what a recipe runs: a config dataclass, one config-only `check` that runs before any model loads, and
`run`. The recipe, the pipeline planner and the recipe tests all call the same `check`; `run` calls it first too.
Jobs register by name in `JOBS` when their module is imported.

`JOB_TABLE` is the one list of jobs: per name, the module that defines it, its recipe script and the module that
registers it as a pipeline stage kind. It names modules as text and `load_jobs` imports them when called, so that the
core imports no package above it; whatever needs every job (the pipeline planner, the configuration reference, the
recipe tests) calls `load_jobs`. A recipe imports its own job directly."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from distill.core.registry import Registry


@dataclass(frozen=True)
class Job:
    name: str
    config_class: type
    check: Callable[[Any], None]
    """Config-only checks: nothing loaded, nothing written."""
    run: Callable[[Any], Any]
    """Runs the job from a checked config; returns its result (a `RunResult` for training jobs)."""
    summary: Callable[[Any, Any], dict | str]
    """(config, result) -> what the recipe prints: a dict (printed as JSON) or text."""


JOBS: Registry[Job] = Registry("job")


def register_job(job: Job) -> Job:
    return JOBS.add(job.name, job)


@dataclass(frozen=True)
class JobEntry:
    module: str
    """The module that defines the job and registers it in `JOBS`."""
    recipe: Optional[str]
    """Its script in recipes/; None: it runs only as a pipeline stage."""
    stage_kind: Optional[str] = None
    """The module that registers the pipeline stage kind of the job's name; None: no stage runs it."""


DISTILL_KINDS, PRUNE_KINDS, QUANT_KINDS = "distill.pipeline.stages", "prune.stages", "quant.stages"

JOB_TABLE: dict[str, JobEntry] = {
    "finetune": JobEntry("distill.encoder.finetune", "finetune_teacher.py", DISTILL_KINDS),
    "distill": JobEntry("distill.encoder.job", "distill_student.py", DISTILL_KINDS),
    "general_distill": JobEntry("distill.encoder.general", "general_distill.py", DISTILL_KINDS),
    "distill_lm": JobEntry("distill.lm.job", "distill_lm.py", DISTILL_KINDS),
    "build_teacher_cache": JobEntry("distill.lm.cache.job", "build_teacher_cache.py"),
    "generate_teacher_data": JobEntry("distill.lm.generate", "generate_teacher_data.py"),
    "pipeline": JobEntry("distill.pipeline.plan", "compress.py"),
    "push": JobEntry("distill.pipeline.hub", None, DISTILL_KINDS),
    "prune": JobEntry("prune.run", "prune_model.py", PRUNE_KINDS),
    "prune_lm": JobEntry("prune.lm", "prune_lm.py", PRUNE_KINDS),
    "quantize": JobEntry("quant.quantize", "quantize_model.py", QUANT_KINDS),
    "qlora": JobEntry("quant.qad.qlora", "qlora_distill.py", QUANT_KINDS),
    "export_onnx": JobEntry("quant.export.onnx", "export_onnx.py", QUANT_KINDS),
    "quantize_lm": JobEntry("quant.quantize_lm", "quantize_lm.py", QUANT_KINDS),
    "export_gguf": JobEntry("quant.export.gguf", "export_gguf.py", QUANT_KINDS),
}


def load_jobs() -> Registry[Job]:
    """`JOBS` with every job of `JOB_TABLE` registered, and every pipeline stage kind (those modules also register
    the kinds that run no job, such as `report`)."""
    for entry in JOB_TABLE.values():
        importlib.import_module(entry.module)
        if entry.stage_kind is not None:
            importlib.import_module(entry.stage_kind)
    return JOBS
