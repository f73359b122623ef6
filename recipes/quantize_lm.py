"""Quantize a causal LM into several variants (bf16, dynamic int8, bitsandbytes int8 / NF4), save and reload each,
and compare perplexity, next-token agreement with the teacher, weight memory and size on disk on one table.

    python recipes/quantize_lm.py --config recipes/quantize_lm.yaml [key.sub=value ...]
    python recipes/quantize_lm.py --config recipes/quantize_lm.yaml variants=[fp32,bnb_nf4]

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from quant.quantize_lm import QUANTIZE_LM


def main(argv: list[str]) -> None:
    run_recipe(QUANTIZE_LM, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
