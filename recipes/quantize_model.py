"""Quantize a saved classifier into several variants (bf16, dynamic int8, bitsandbytes int8/NF4/FP4), save and
reload each, and compare accuracy, memory, size on disk and CPU latency on one table.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/quantize_model.py \
        --config recipes/quantize_student.yaml [key.sub=value ...]
    python recipes/quantize_model.py --config recipes/quantize_student.yaml variants=[fp32,bnb_nf4,bnb_fp4]
"""
import sys

from distill.config import parse_args_or_exit
from quant.config import QuantConfig
from quant.run import quantize


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(QuantConfig, argv)
    result = quantize(cfg)
    print((result.run_dir / "report.md").read_text(), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
