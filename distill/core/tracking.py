"""A run's progress log: each record is a line of `metrics.jsonl`, and its numbers also go to the experiment trackers
that `train.report_to` names (through Accelerate)."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator


def log_record(accelerator: Accelerator, run_dir: Path, record: dict) -> None:
    """Append `record` to metrics.jsonl (main process), and send its numbers to the configured trackers."""
    if accelerator.is_main_process:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log(tracked_scalars(record), step=record.get("step"))


def tracked_scalars(record: dict) -> dict[str, float]:
    """A log record's numbers as tracker scalars: grouped by stage (`stage0/train_loss`), whose optimizer steps
    each start from 0, and nested records flattened (`final/test_accuracy`)."""
    prefix = f"stage{record['stage']}/" if "stage" in record else ""
    scalars = {}
    for name, value in record.items():
        if isinstance(value, dict):
            scalars.update({f"{name}/{key}": v for key, v in tracked_scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("stage", "step"):
            scalars[prefix + name] = value
    return scalars


@contextmanager
def quiet_loggers(*names: str):
    """Only errors from the loggers `names` (and their children) inside the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
