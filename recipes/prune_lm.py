"""Prune a causal LM Minitron-style (width: key/value head groups, FFN neurons, hidden channels; depth: whole
layers), ranked on calibration text, to given sizes or a parameter count; recover it with recipes/distill_lm.py
(`student.init: pretrained`).

    python recipes/prune_lm.py --config recipes/prune_lm.yaml [key.sub=value ...]
    python recipes/prune_lm.py --config recipes/prune_lm.yaml target_parameters=null width.intermediate_size=768

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from prune.lm import PRUNE_LM


def main(argv: list[str]) -> None:
    run_recipe(PRUNE_LM, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
