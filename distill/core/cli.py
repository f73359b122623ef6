"""The command line every recipe shares: `--config file.yaml` plus `key.sub=value` overrides, the job's check, the
run, and its summary printed. A bad config ends the program with one line, `config error: ...`, and exit status 2; a
failed gate (`distill.core.gate`) with `gate failed: ...` and exit status 3; `--debug` (or DISTILL_DEBUG=1) shows the
traceback instead."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Optional

from distill.core.config import parse_args
from distill.core.errors import ConfigError
from distill.core.gate import GateFailed
from distill.core.jobs import Job
from distill.core.run import launch_teardown

DEBUG_FLAG = "--debug"
CONFIG_ERROR_EXIT = 2
GATE_FAILED_EXIT = 3
DEBUG_ENV = "DISTILL_DEBUG"


def split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether debugging was asked for (flag or environment), and the arguments without the flag."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    return len(rest) < len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


@contextmanager
def config_errors(debug: bool):
    """A `ConfigError` inside ends the program: one line on stderr and exit status 2 (a `GateFailed`: exit status
    3); the traceback with `debug`."""
    try:
        yield
    except (ConfigError, GateFailed) as err:
        if debug:
            raise
        failed_gate = isinstance(err, GateFailed)
        print(f"{'gate failed' if failed_gate else 'config error'}: {err}", file=sys.stderr)
        sys.exit(GATE_FAILED_EXIT if failed_gate else CONFIG_ERROR_EXIT)


def run_recipe(job: Job, argv: Optional[list[str]] = None, adjust: Optional[Callable[[Any], Any]] = None) -> Any:
    """Parse, check and run `job`, then print its summary. `adjust` may change the parsed config (flags a recipe
    adds, such as `--push-to-hub`). In a launch of several processes, each ends through `launch_teardown`."""
    debug, argv = split_debug(sys.argv[1:] if argv is None else argv)
    with config_errors(debug):
        cfg = parse_args(job.config_class, argv)
        if adjust is not None:
            cfg = adjust(cfg)
        job.check(cfg)
        with launch_teardown():
            result = job.run(cfg)
    summary = job.summary(cfg, result)
    print(summary if isinstance(summary, str) else json.dumps(summary, indent=2), end="" if isinstance(summary, str)
          else "\n")
    return result
