"""Prune a fine-tuned model (heads, FFN neurons, layers, low-rank, sparsity) and recover it by distillation.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/prune_model.py \
        --config recipes/prune_heads_ffn.yaml [key.sub=value ...]
    python recipes/prune_model.py --config recipes/prune_heads_ffn.yaml importance.criterion=fisher seed=1

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from prune.run import PRUNE


def main(argv: list[str]) -> None:
    run_recipe(PRUNE, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
