"""Run a causal-LM teacher once over a text corpus and keep its top-k log-probabilities at every token
(`distill.lm.cache`), so that distillation runs read them instead of loading the teacher.

    python recipes/build_teacher_cache.py --config recipes/cache_teacher.yaml [key.sub=value ...]
    python recipes/build_teacher_cache.py --config recipes/cache_teacher.yaml data.limit=200 k=32

A killed build, run again with the same settings, resumes after its last finished shard.

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from distill.lm.cache.job import BUILD_CACHE


def main(argv: list[str]) -> None:
    run_recipe(BUILD_CACHE, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
