"""From teacher to served model in one run: the stages that the pipeline YAML lists (fine-tune, distil, prune,
quantize, report, push), each stage's model feeding the next. A re-run skips the stages that are complete with an
unchanged config, reruns a changed stage and those after it, and resumes an interrupted one.

    python recipes/compress.py --config recipes/compress.yaml [key.sub=value ...] [--push-to-hub you/model-name]
    python recipes/compress.py --config recipes/compress.yaml stages.2.overrides.variants=[fp32,bnb_nf4]

`--push-to-hub` adds a last stage that uploads the served model, its card and report (token: HF_TOKEN or
`hf auth login`).

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import argparse
import logging
import sys

from distill.core.cli import run_recipe
from distill.pipeline.plan import PIPELINE, with_push


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser.add_argument("--push-to-hub", metavar="REPO_ID")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Hub request otherwise
    run_recipe(PIPELINE, rest, adjust=lambda cfg: with_push(cfg, args.push_to_hub) if args.push_to_hub else cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
