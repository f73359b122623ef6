"""Each variant runs in a fresh subprocess (`distill.core.probe.run_probe`), so that its resident peak is its own;
training steps are timed from the end of one optimizer step to the end of the next; variants take turns over the
repeats (in rotated order, so that none always runs first), and each is summarised by medians. Peer frameworks run
from virtual environments of their own."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.core.config import to_dict
from distill.core.probe import resident_peak_mb


def peak_mb(device: torch.device) -> float:
    """torch's peak allocation on a CUDA device, else the process's resident peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resident_peak_mb()


def rotated_order(variants: list[str], repeats: int) -> list[str]:
    """The runs of `repeats` rounds, each round every variant once, starting one variant later than the round before."""
    return [variants[(start + i) % len(variants)] for start in range(repeats) for i in range(len(variants))]


def timed_steps(step_ends: list[float], warmup: int) -> list[float]:
    """Seconds of each step after the first `warmup`, from the times at which steps ended (the first step's start is
    not seen: at least one step is warm-up)."""
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 step (the first step has no start time); got {warmup}")
    if len(step_ends) <= warmup:
        raise ValueError(f"{len(step_ends)} steps ended, none after the {warmup} warm-up steps")
    return [end - start for start, end in zip(step_ends[warmup - 1:], step_ends[warmup:])]


class StepClock:
    """Notes when each optimizer step ends; at the last of `total` steps it also notes the resident peak, over the
    peak when the clock was made (after imports). `tick()` says whether that was the last step."""

    def __init__(self, total: int, warmup: int):
        if total <= warmup:
            raise ValueError(f"{total} steps leave none to time after {warmup} warm-up steps")
        self.total, self.warmup = total, warmup
        self.baseline_mb, self.peak_mb = resident_peak_mb(), None
        self.ends: list[float] = []

    def tick(self) -> bool:
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.total:
            self.peak_mb = resident_peak_mb()
        return len(self.ends) >= self.total

    def result(self) -> dict:
        return {"step_seconds": timed_steps(self.ends, self.warmup),
                "peak_rss_growth_mb": round(self.peak_mb - self.baseline_mb, 1)}


def summarise(runs: list[dict]) -> dict:
    """One variant's runs (`StepClock.result()`s): the median over runs of each run's median step, and of its peak."""
    seconds = statistics.median(statistics.median(run["step_seconds"]) for run in runs)
    return {"seconds_per_step": seconds, "steps_per_second": 1 / seconds, "runs": len(runs),
            "peak_rss_growth_mb": statistics.median(run["peak_rss_growth_mb"] for run in runs)}


def ratio(value: float, base: float) -> str:
    """`value / base` as `1.23x`, or `-` where `base` is 0: a run too small to lift the resident peak over the one
    that imports left grows it by 0."""
    return f"{value / base:.2f}x" if base else "-"


def config_differences(configs: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """`field: name=value, ...` for each dotted field (`train.batch_size`) whose value is not the same in all
    `configs` (dataclass configs, by name)."""
    values = {name: to_dict(cfg) for name, cfg in configs.items()}
    differences = []
    for dotted in fields:
        seen = {name: dotted_value(tree, dotted) for name, tree in values.items()}
        if len({json.dumps(value, sort_keys=True) for value in seen.values()}) > 1:
            differences.append(f"{dotted}: " + ", ".join(f"{name}={value!r}" for name, value in seen.items()))
    return differences


def dotted_value(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def peer_environment(folder: Path, requirement: str, usable: str, extras: Sequence[tuple[str, str]] = ()) -> Path:
    """The Python of the virtual environment `folder` that holds a peer framework, made on first use: it sees this
    environment's packages (torch, transformers, ...) through a .pth file and gets `requirement` installed without
    dependencies, so the peer never becomes a dependency of the project. `extras` are (module, requirement) pairs
    installed (with dependencies) when the module cannot be imported; `usable` is Python code that succeeds once
    the peer works."""
    python = folder / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # this environment's packages, after the peer environment's own
        Path(site, "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for module, extra in extras:
        if not succeeds(python, f"import {module}"):
            pip_install(python, extra)
    if not succeeds(python, usable):
        pip_install(python, "--no-deps", requirement)
        if not succeeds(python, usable):
            raise RuntimeError(f"{folder} has {requirement} installed, but this fails there: {usable}")
    return python


def succeeds(python: Path, code: str) -> bool:
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def pip_install(python: Path, *requirements: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
                   check=True)
