"""Quantization-aware distillation (QLoRA-style): quantize a classifier to NF4 (or FP4, or int8), add LoRA adapters,
and distil them from the full-precision teacher; save the adapters and the adapters merged into a full-precision copy.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/qlora_distill.py \
        --config recipes/qlora_distill.yaml [key.sub=value ...]
    python recipes/qlora_distill.py --config recipes/qlora_distill.yaml bits=8 output_dir=runs/qlora-int8
"""
import json
import sys

from distill.config import parse_args_or_exit
from quant.config import QatConfig
from quant.qat import qat_distill


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(QatConfig, argv)
    result = qat_distill(cfg)
    outputs = {"adapter": f"{cfg.output_dir}/adapter", "merged": f"{cfg.output_dir}/model" if cfg.merge else None}
    print(json.dumps({**outputs, **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
