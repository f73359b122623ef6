"""General distillation: a fresh small encoder learns a base encoder's hidden states and attention maps on unlabelled
text (by default a 4-layer, 128-wide student of all-MiniLM-L6-v2 on IMDB review sentences), before task distillation.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/general_distill.py \
        --config recipes/general_distill.yaml [key.sub=value ...]

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.encoder.general import GENERAL_DISTILL


def main(argv: list[str]) -> None:
    run_recipe(GENERAL_DISTILL, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
