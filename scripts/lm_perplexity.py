"""Perplexity of the teacher and of the untrained student on the held-out slices of an LM distillation config: the
two ends of the scale that a run's test perplexity sits between.

    python scripts/lm_perplexity.py --config recipes/distill_lm.yaml [student.layers=[0,2,4] ...]
    python scripts/lm_perplexity.py --config recipes/distill_lm.yaml --model runs/student-lm/model

The slices are exactly those `recipes/distill_lm.py` holds out for the same config (same corpus, tokenizer and
split sizes). With `--model`, that saved model is measured instead of the teacher and the untrained student."""
import argparse
import json
import sys

from benchmarks.lm import measure
from distill.core.cli import config_errors, split_debug
from distill.core.config import parse_args
from distill.core.models import load_causal_lm
from distill.core.student import build_student
from distill.lm.config import LMDistillConfig
from distill.lm.job import check_lm_distill


def main(argv: list[str]) -> None:
    """A bad config ends the program as a recipe's does: one line `config error: ...`, exit status 2."""
    debug, argv = split_debug(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved causal LM to measure instead of the teacher and the initial student")
    args, config_args = parser.parse_known_args(argv)
    with config_errors(debug):
        cfg = parse_args(LMDistillConfig, config_args)
        check_lm_distill(cfg)
        if args.model:
            models = {args.model: load_causal_lm(args.model)}
        else:
            teacher = load_causal_lm(cfg.teacher)
            models = {"teacher": teacher,
                      "student_before_training": build_student(cfg.student, teacher, load_causal_lm)}
        print(json.dumps(measure(cfg, models), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
