"""Training steps per second and peak memory of causal-LM distillation three ways, on the same batches: next-token CE
alone (no teacher), online (the live teacher: forward KL + CE) and cached (top-k KL from a teacher cache + CE); and
the cache's size on disk per token.

    python scripts/bench_lm_step.py [--ce recipes/distill_lm_ce.yaml --online recipes/distill_lm.yaml \
        --cached recipes/distill_lm_cached.yaml --cache runs/teacher-cache-lm] [--steps 10 --warmup 2 --repeats 3] \
        [key=value ...]

Each run is `distill_lm` itself in a subprocess of its own, stopped once its steps are done: loading the models and
tokenizing the corpus come before the first step, evaluation and saving would come after the last, and none of it
is timed. A step counts from the end of the optimizer step before it, so it holds the batch's collation (and cache
reads), the teacher's forward, the student's forward and backward and the optimizer step; checkpoints are put off
past the last step. The first `--warmup` steps are not timed. The variants take turns over `--repeats` rounds; each
is reported by the median over its runs of the run's median step.

Peak memory is the growth of the subprocess's resident peak from after imports to the end of its last step, loading
included: the teacher's weights count for the online run; the other two load the teacher only to copy the student's
layers from it. The configs must agree on what decides the batches and the student's start (the script says where
they do not); `key=value` overrides apply to all three."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import config_differences, ratio, rotated_order, summarise
from benchmarks.lm import run_variant
from distill.core.config import parse_args
from distill.core.errors import ConfigError
from distill.core.probe import run_probe
from distill.lm.cache.store import TeacherCache
from distill.lm.config import LMDistillConfig
from distill.lm.job import check_lm_distill

VARIANTS = ("ce", "online", "cached")
SAME_BATCHES = ("teacher", "seed", "data", "student", "validation_examples", "test_examples", "train.batch_size",
                "train.group_by_length", "train.gradient_accumulation_steps", "train.mixed_precision")
"""What decides the batches each step sees, the student's starting weights and the arithmetic's precision."""


def variant_config(args, variant: str, overrides: list[str], run_dir: str = "unused") -> LMDistillConfig:
    total = args.warmup + args.steps
    argv = ["--config", getattr(args, variant), *overrides, f"output_dir={run_dir}",
            f"train.max_steps_per_stage={total}", f"train.save_steps={total + 1}"]
    cache = [f"cache={args.cache}"] if variant == "cached" and args.cache else []
    cfg = parse_args(LMDistillConfig, argv + cache)
    check_lm_distill(cfg)
    return cfg


def losses_text(cfg: LMDistillConfig) -> str:
    return " + ".join(f"{loss.weight:g} {loss.name}" for stage in cfg.stages for loss in stage.losses)


def markdown(summary: dict[str, dict], configs: dict[str, LMDistillConfig], args) -> str:
    base = summary.get("ce")
    lines = ["| variant | losses | s/step | steps/s | step time vs CE | peak RSS growth MB | peak vs CE |",
             "|---|---|---|---|---|---|---|"]
    for variant, row in summary.items():
        time_ratio = f"{row['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "-"
        memory_ratio = ratio(row['peak_rss_growth_mb'], base['peak_rss_growth_mb']) if base else "-"
        lines.append(f"| {variant} | {losses_text(configs[variant])} | {row['seconds_per_step']:.2f} | "
                     f"{row['steps_per_second']:.3f} | {time_ratio} | {row['peak_rss_growth_mb']:.0f} | "
                     f"{memory_ratio} |")
    cfg = next(iter(configs.values()))
    lines.append(f"\nBatch {cfg.train.batch_size} x up to {cfg.data.max_length} tokens; medians of {args.repeats} "
                 f"run(s) per variant, {args.steps} timed steps each after {args.warmup} warm-up steps.")
    return "\n".join(lines)


def cache_text(sizes: dict, vocab_size: int) -> str:
    return (f"Teacher cache: {sizes['total'] / 2**20:.1f} MiB for {sizes['tokens']} tokens of {sizes['examples']} "
            f"texts: {sizes['per_token']:.0f} bytes per token ({sizes['payload_per_token']} of them the rows' values "
            f"and ids); the full float16 distribution would take {2 * vocab_size} bytes per token.")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ce", default="recipes/distill_lm_ce.yaml", help="the CE-only LM config")
    parser.add_argument("--online", default="recipes/distill_lm.yaml", help="the live-teacher LM config")
    parser.add_argument("--cached", default="recipes/distill_lm_cached.yaml", help="the teacher-cache LM config")
    parser.add_argument("--cache", default=None, help="the cache folder for --cached (default: the config's `cache`)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, in alternation")
    parser.add_argument("--json", type=Path, help="also write every run's step times and the summary here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # run one, in this process
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return parser, args, overrides


def main(argv: list[str]) -> None:
    parser, args, overrides = parse(argv)
    if args.variant:
        cfg = variant_config(args, args.variant, overrides, args.run_dir)
        print(json.dumps(run_variant(cfg, args.warmup + args.steps, args.warmup)))
        return
    try:
        configs = {variant: variant_config(args, variant, overrides) for variant in args.variants}
    except ConfigError as err:
        parser.error(str(err))
    differences = config_differences(configs, SAME_BATCHES)
    if differences:
        parser.error("the configs would not train the same student on the same batches:\n  " +
                     "\n  ".join(differences))
    try:
        cache = TeacherCache.open(configs["cached"].cache) if "cached" in configs else None
    except ConfigError as err:
        parser.error(f"{err}\n(build the cache with recipes/build_teacher_cache.py, or leave out the cached variant: "
                     "--variants ce online)")
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for variant in rotated_order(args.variants, args.repeats):
        with tempfile.TemporaryDirectory(prefix=f"bench-lm-{variant}-") as run_dir:
            run = run_probe([sys.executable, __file__, *argv, "--variant", variant, "--run-dir", run_dir])
        runs[variant].append(run)
        print(f"{variant}: median step {statistics.median(run['step_seconds']):.2f} s, "
              f"peak +{run['peak_rss_growth_mb']:.0f} MB", file=sys.stderr)
    summary = {variant: summarise(variant_runs) for variant, variant_runs in runs.items()}
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs,
                                         "cache": cache.sizes() if cache else None}, indent=2))
    print(markdown(summary, configs, args))
    if cache:
        print("\n" + cache_text(cache.sizes(), cache.manifest["teacher"]["vocab_size"]))


if __name__ == "__main__":
    main(sys.argv[1:])
