"""Time of one distillation training step against its floor, on a real teacher and the default 3-layer student.

Each variant is a real run through `distill.encoder.job` (the project's `Objective` and `Trainer` loop, AdamW
included), cut after `--steps` optimizer steps; a step's time is the gap between two `on_step` calls, so it holds
everything the loop does per batch. Every variant sees the same batches (same seed, same sampler): Rotten Tomatoes sentences cut at
`--max-length` tokens, padded per batch and grouped by length, as training does.

  (a) floor      plain fine-tuning of the student: hard-label CE only, the teacher never runs
  (b) response   KL at temperature 2 + CE, the teacher's logits cached before training (the teacher never runs)
      response_live  the same losses with the teacher run live on every batch, for comparison
  (c) tinybert   live teacher; KL + CE + hidden-state MSE + attention MSE (recipes/distill_tinybert.yaml)
  (d) teacher    the teacher's forward alone at its cheapest: fp32, default attention, inference mode, logits only

The variants alternate in rounds, and each round's median steps give the ratios (b)/(a) and (c)/((a)+(d)); the
report is the median over rounds. `--teacher-dtype bfloat16` runs (b)'s cache pass and (c)'s teacher in bf16 and
adds how far that moved the teacher's logits (on the 32 validation examples the runs keep); (d) stays fp32.
`--profile` instead prints a torch.profiler table of one step of (c).

    OMP_NUM_THREADS=2 python scripts/bench_distill_step.py --teacher runs/teacher/model [--rounds 5 --steps 12]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from benchmarks.harness import timed_steps
from distill.core.config import parse_args
from distill.core.data import collator
from distill.core.loss_interface import model_inputs
from distill.core.run import load_task
from distill.core.trainer import TrainState, train_sampler
from distill.encoder.config import DistillConfig
from distill.encoder.job import distill
from distill.encoder.single import load_teacher

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
VARIANT_RECIPES = {"floor": "distill_response.yaml", "response": "distill_response.yaml",
                   "response_live": "distill_response.yaml", "tinybert": "distill_tinybert.yaml"}
WARMUP_STEPS = 2
"""Steps left out of each run's timing: the first ones allocate buffers and warm caches."""


def variant_config(variant: str, args, output_dir: Path) -> DistillConfig:
    """The recipe of `variant`, cut to `args.steps` steps over as many batches, on `args.teacher`."""
    overrides = [f"teacher={args.teacher}", f"output_dir={output_dir}", f"train.max_steps_per_stage={args.steps}",
                 f"train.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
                 f"data.max_train_examples={args.steps * args.batch_size}", "data.max_eval_examples=32",
                 "train.select_best=false", f"train.save_steps={args.steps + 1}", "train.log_steps=1000",
                 f"train.teacher_dtype={args.teacher_dtype}"]
    if variant == "floor":
        overrides.append("stages.0.losses=[{name: ce}]")
    if variant == "response":
        overrides.append("train.cache_teacher_logits=true")
    return parse_args(DistillConfig, ["--config", str(RECIPES / VARIANT_RECIPES[variant]), *overrides])


def reset_accelerate() -> None:
    """Each run builds its own Accelerator; Accelerate keeps process-wide singletons between them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def step_times(cfg: DistillConfig, on_step=None) -> list[float]:
    """Seconds of each optimizer step of one run, the warm-up steps left out."""
    marks = []

    def mark(state: TrainState) -> None:
        marks.append(time.perf_counter())
        if on_step:
            on_step(state)

    distill(cfg, on_step=mark)
    reset_accelerate()
    return timed_steps(marks, WARMUP_STEPS)


def training_batches(cfg: DistillConfig) -> tuple[PreTrainedModel, list[dict]]:
    """The plain teacher (fp32, default attention) and the batches the runs train on, in their order."""
    task = load_task(cfg.data, cfg.teacher)
    train = task.splits["train"]
    loader = DataLoader(train, cfg.train.batch_size, sampler=train_sampler(train, cfg.train, cfg.seed),
                        collate_fn=collator(task.tokenizer))
    plain = DistillConfig(teacher=cfg.teacher)  # no loss reads attention maps: the default attention
    return load_teacher(plain, task).eval(), list(loader)


@torch.inference_mode()
def teacher_forward_times(teacher: PreTrainedModel, batches: list[dict]) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        teacher(**model_inputs(batch))
        times.append(time.perf_counter() - start)
    return times[WARMUP_STEPS:]


def logged_drift(run_dir: Path) -> dict[str, float]:
    """What the run logged about its teacher's outputs in `train.teacher_dtype` against fp32 (validation split)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(line["teacher_dtype_drift"] for line in lines if "teacher_dtype_drift" in line)


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        configs = {variant: variant_config(variant, args, Path(tmp) / variant) for variant in VARIANT_RECIPES}
        teacher, batches = training_batches(configs["floor"])
        rounds = []
        for index in range(args.rounds):
            medians = {variant: statistics.median(step_times(cfg)) for variant, cfg in configs.items()}
            medians["teacher"] = statistics.median(teacher_forward_times(teacher, batches))
            rounds.append(medians)
            print(json.dumps({"round": index, **{k: round(v, 4) for k, v in medians.items()}}), flush=True)
        drift = logged_drift(Path(configs["tinybert"].output_dir)) if args.teacher_dtype != "float32" else None
    ratios = [{"response/floor": r["response"] / r["floor"], "response_live/floor": r["response_live"] / r["floor"],
               "tinybert/(floor+teacher)": r["tinybert"] / (r["floor"] + r["teacher"])} for r in rounds]
    report = {"seconds": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
              "ratios": {k: statistics.median(r[k] for r in ratios) for k in ratios[0]},
              "settings": {k: getattr(args, k) for k in ("rounds", "steps", "batch_size", "max_length",
                                                         "teacher_dtype")},
              "threads": torch.get_num_threads()}
    if drift:
        report["teacher_dtype_drift"] = drift
    return report


def profile_one_step(args) -> None:
    """torch.profiler's table of one (c) step, the third of its run (after warm-up)."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)

    def toggle(state: TrainState) -> None:
        if state.global_step == WARMUP_STEPS:
            profiler.start()
        elif state.global_step == WARMUP_STEPS + 1:
            profiler.stop()

    with tempfile.TemporaryDirectory() as tmp:
        step_times(variant_config("tinybert", args, Path(tmp)), on_step=toggle)
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile_rows))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/teacher/model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first 2 not timed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="train.teacher_dtype of (b) and (c); (d) stays fp32")
    parser.add_argument("--profile", action="store_true", help="print a profile of one (c) step instead")
    parser.add_argument("--profile-rows", type=int, default=30)
    args = parser.parse_args(argv)
    if args.steps < WARMUP_STEPS + 2:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2}: the first {WARMUP_STEPS} are not timed")
    if args.profile:
        profile_one_step(args)
    else:
        print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
