"""Fine-tune a teacher on a classification task.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/finetune_teacher.py \
        --config recipes/teacher.yaml [key.sub=value ...]
    python recipes/finetune_teacher.py --config recipes/teacher.yaml stage.epochs=1
"""
import json
import sys

from distill.config import FinetuneConfig, parse_args_or_exit
from distill.run import finetune


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(FinetuneConfig, argv)
    result = finetune(cfg)
    print(json.dumps({"teacher": f"{cfg.output_dir}/model", **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
