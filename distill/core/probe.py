"""A measurement in a process of its own, so that the resident peak it reports is its own: the probe prints one JSON
object as the last line of its stdout. The peak is `VmHWM`, the high-water mark of the process's own memory map:
getrusage's maxrss would not do, since Linux carries it over from the parent across fork and exec, so a probe
started by a larger process would report that process's peak."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

# Every allocation mapped and unmapped on its own: otherwise glibc keeps freed blocks in its heap, and the resident
# peak would count memory that torch has already released.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_probe(command: list[str], env: Optional[dict[str, str]] = None) -> dict:
    """Run `command` in a subprocess under `PROBE_ENV` (plus `env`); the JSON object on the last line of its stdout."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PROBE_ENV, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(command)} printed no result:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def resident_peak_mb() -> float:
    """This process's resident high-water mark (`VmHWM`), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10  # kB
    raise RuntimeError("/proc/self/status has no VmHWM: the resident peak is measured on Linux only")
