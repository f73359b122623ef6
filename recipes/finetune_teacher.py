"""Fine-tune a teacher on a classification task.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/finetune_teacher.py \
        --config recipes/teacher.yaml [key.sub=value ...]
    python recipes/finetune_teacher.py --config recipes/teacher.yaml stage.epochs=1

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.encoder.finetune import FINETUNE


def main(argv: list[str]) -> None:
    run_recipe(FINETUNE, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
