"""Loss weight and temperature schedules across a stage: each value moves from its configured start at progress 0
(the stage's first optimizer step) to its `final_*` value at progress 1 (the stage's end)."""
import math
from typing import Optional

from distill.core.config import LossConfig
from distill.core.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def scheduled(kind: str, start: float, end: Optional[float], progress: float) -> float:
    """The value at `progress` (0..1) of a `kind` schedule from `start` to `end` (None: stay at `start`)."""
    if kind == "constant" or end is None:
        return start
    if kind == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def check_schedule(spec: LossConfig, where: str = "") -> None:
    """Refuse schedules that cannot mean what the user wants, before any model loads."""
    name = f"{where}loss '{spec.name}'"
    if spec.schedule not in SCHEDULES:
        raise ConfigError(f"{name}: schedule must be one of {SCHEDULES}, got '{spec.schedule}'")
    finals = [key for key in ("final_weight", "final_temperature") if getattr(spec, key) is not None]
    if spec.schedule == "constant" and finals:
        raise ConfigError(
            f"{name}: {' and '.join(finals)} set but schedule is 'constant'; use 'linear' or 'cosine', or drop it"
        )
    if spec.schedule != "constant" and not finals:
        raise ConfigError(f"{name}: schedule '{spec.schedule}' needs final_weight or final_temperature "
                          "(the value at the end of the stage)")
    for key in ("temperature", "final_temperature"):
        value = getattr(spec, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: {key} must be positive, got {value}")
