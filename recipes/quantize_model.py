"""Quantize a saved classifier into several variants (bf16, dynamic int8, bitsandbytes int8/NF4/FP4), save and
reload each, and compare accuracy, memory, size on disk and CPU latency on one table.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/quantize_model.py \
        --config recipes/quantize_student.yaml [key.sub=value ...]
    python recipes/quantize_model.py --config recipes/quantize_student.yaml variants=[fp32,bnb_nf4,bnb_fp4]

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from quant.quantize import QUANTIZE


def main(argv: list[str]) -> None:
    run_recipe(QUANTIZE, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
