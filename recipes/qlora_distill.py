"""Quantization-aware distillation (QLoRA-style): quantize a classifier to NF4 (or FP4, or int8), add LoRA adapters,
and distil them from the full-precision teacher; save the adapters and the adapters merged into a full-precision copy.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/qlora_distill.py \
        --config recipes/qlora_distill.yaml [key.sub=value ...]
    python recipes/qlora_distill.py --config recipes/qlora_distill.yaml bits=8 output_dir=runs/qlora-int8

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from quant.qad.qlora import QLORA


def main(argv: list[str]) -> None:
    run_recipe(QLORA, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
