"""Run a causal-LM teacher once over a text corpus and keep its top-k log-probabilities at every token
(`distill.cache`), so that distillation runs read them instead of loading the teacher.

    python recipes/build_teacher_cache.py --config recipes/cache_teacher.yaml [key.sub=value ...]
    python recipes/build_teacher_cache.py --config recipes/cache_teacher.yaml data.limit=200 k=32

A killed build, run again with the same settings, resumes after its last finished shard."""
import json
import sys

from distill.cache import build_from_config
from distill.config import CacheConfig, parse_args_or_exit


def main(argv: list[str]) -> None:
    cfg = parse_args_or_exit(CacheConfig, argv)
    cache = build_from_config(cfg)
    print(json.dumps({"cache": str(cache.folder), **cache.sizes()}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
