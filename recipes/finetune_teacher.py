"""Fine-tune a teacher on a classification task.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/finetune_teacher.py \
        --config recipes/teacher.yaml [key.sub=value ...]
    python recipes/finetune_teacher.py --config recipes/teacher.yaml stage.epochs=1
"""
import json
import sys

from distill.config import ConfigError, FinetuneConfig, parse_args
from distill.run import finetune


def main(argv: list[str]) -> None:
    try:
        cfg = parse_args(FinetuneConfig, argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    result = finetune(cfg)
    print(json.dumps({"teacher": f"{cfg.output_dir}/model", **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
