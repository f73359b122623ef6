"""Distil a fine-tuned teacher (or several: `extra_teachers`) into a smaller student, in the stages the config
lists (TinyBERT-style), for one or more born-again `generations`.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/distill_student.py \
        --config recipes/distill_tinybert.yaml [key.sub=value ...]
    python recipes/distill_student.py --config recipes/distill_tinybert.yaml seed=1 output_dir=runs/student-s1
"""
import json
import sys

from distill.config import DistillConfig, parse_args_or_exit
from distill.run import distill


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(DistillConfig, argv)
    result = distill(cfg)
    print(json.dumps({"student": str(result.run_dir / "model"), **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
