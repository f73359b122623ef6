"""Distil a fine-tuned teacher (or several: `extra_teachers`) into a smaller student, in the stages the config
lists (TinyBERT-style), for one or more born-again `generations`.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/distill_student.py \
        --config recipes/distill_tinybert.yaml [key.sub=value ...]
    python recipes/distill_student.py --config recipes/distill_tinybert.yaml seed=1 output_dir=runs/student-s1

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.encoder.job import DISTILL


def main(argv: list[str]) -> None:
    run_recipe(DISTILL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
