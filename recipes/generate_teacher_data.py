"""Sequence-level distillation data (`distill.lm.generate`): the teacher writes a completion of every training prompt,
the held-out examples keep their references; a student then learns from data.jsonl with recipes/distill_lm.py.

    python recipes/generate_teacher_data.py --config recipes/generate_teacher_data.yaml [key.sub=value ...]
    python recipes/generate_teacher_data.py --config recipes/generate_teacher_data.yaml sampling.temperature=0

A killed run, run again with the same settings, resumes after its last finished shard (and writes what an
uninterrupted run would); other settings over the same output_dir are refused.

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.lm.generate import GENERATE_TEACHER_DATA


def main(argv: list[str]) -> None:
    run_recipe(GENERATE_TEACHER_DATA, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
