"""Distil a causal LM (by default the offline SmolLM2-135M-Instruct) into a student of a subset of its layers, token
by token on unlabelled text, from the teacher running beside it or from a teacher cache (`cache` + `topk_kl`).

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/distill_lm.py \
        --config recipes/distill_lm.yaml [key.sub=value ...]
    python recipes/distill_lm.py --config recipes/distill_lm_cached.yaml cache=runs/teacher-cache-lm

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.lm.job import LM_DISTILL


def main(argv: list[str]) -> None:
    run_recipe(LM_DISTILL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
