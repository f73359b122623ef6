"""A job is what a recipe runs: a config dataclass, one config-only `check` that runs before any model loads, and
`run`. The recipe, the pipeline planner and the recipe tests all call the same `check`; `run` calls it first too.
Jobs register by name in `JOBS` when their module is imported."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
