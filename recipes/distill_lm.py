"""Distil a causal LM (by default the offline SmolLM2-135M-Instruct) into a student of a subset of its layers, token
by token on unlabelled text, from the teacher running beside it or from a teacher cache (`cache` + `topk_kl`).

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/distill_lm.py \
        --config recipes/distill_lm.yaml [key.sub=value ...]
    python recipes/distill_lm.py --config recipes/distill_lm_cached.yaml cache=runs/teacher-cache-lm
"""
import json
import sys

from distill.config import LMDistillConfig, parse_args_or_exit
from distill.lm import distill_lm


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(LMDistillConfig, argv)
    result = distill_lm(cfg)
    print(json.dumps({"student": str(result.run_dir / "model"), **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
