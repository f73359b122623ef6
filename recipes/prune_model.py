"""Prune a fine-tuned model (heads, FFN neurons, layers, low-rank, sparsity) and recover it by distillation.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/prune_model.py \
        --config recipes/prune_heads_ffn.yaml [key.sub=value ...]
    python recipes/prune_model.py --config recipes/prune_heads_ffn.yaml importance.criterion=fisher seed=1
"""
import json
import sys

from distill.config import parse_args_or_exit
from prune.config import PruneConfig
from prune.run import prune


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(PruneConfig, argv)
    result = prune(cfg)
    print(json.dumps({"model": f"{cfg.output_dir}/model", **result.metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
