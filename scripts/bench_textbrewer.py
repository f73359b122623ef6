"""Our framework against TextBrewer 0.2.1 on identical work: the same teacher distilled into the same student
initialisation, on the same batches in the same order, with the same losses, optimizer, schedule, clipping and
number of steps, both in float32 on the CPU. Reported: training steps per second (median over the steps after a
warm-up, and over all timed steps), their ratio, peak resident memory, and the test accuracy of both students after
the steps; with a check that both started from the same weights and saw the same batches.

    python scripts/bench_textbrewer.py --steps 100 --repeats 3 --json runs/bench-textbrewer.json

Each side runs in its own process: ours through `distill.encoder.job.distill` (the recipe's real Trainer path) in this
environment; TextBrewer's BasicDistiller in `.bench-envs/textbrewer`, created on first use, which sees this
environment's packages (torch, transformers, tensorboard) through a .pth file and gets only TextBrewer installed, so
TextBrewer never becomes a dependency of the project. Repeats alternate which side runs first. `--ours KEY=VALUE`
overrides the recipe on our side only, for what the framework offers to do the same work cheaper (cached teacher
logits, a bf16 teacher, bf16 mixed precision): the losses, data, weights and batches stay the same and are checked.

What makes the two runs the same work:
- recipe: `--recipe` (default recipes/distill_response.yaml), one stage of a `kl` loss and optionally `ce`, with
  `train.max_steps_per_stage` set to `--steps` and `train.select_best` off (the student after exactly those steps);
- data, teacher and student: both sides load them with distill's own functions (same splits, tokenization, student
  built from the teacher as the recipe says); TextBrewer's loader replays `planned_batches`, the order our Trainer's
  seeded sampler gives;
- losses: TextBrewer's `kd_loss_type='ce'` is the soft cross-entropy without the T^2 factor. It differs from our
  KL(teacher || student) only by the teacher's entropy, which has no gradient, so its weight is the KL weight times
  T^2; its hard-label loss is the student's own cross-entropy (the model is called with the labels) at the `ce` weight;
- optimizer: AdamW with `distill.core.trainer.param_groups` (no decay on biases and norms), the recipe's learning
  rate, and transformers' `get_scheduler` with the same warm-up and length; gradients clipped to `train.max_grad_norm`.
Checked, not assumed: torch's global optimizer hooks fingerprint the parameters just before the first step and time
every step in both processes, and both record the token ids of every batch (`distill.core.trainer.RankTrace`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmarks.harness import peer_environment
from distill.core.config import LossConfig, StageConfig, parse_args
from distill.core.errors import ConfigError
from distill.core.fingerprint import text_sha256
from distill.core.probe import resident_peak_mb
from distill.encoder.config import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
BENCH_ENV = ROOT / ".bench-envs" / "textbrewer"
TEXTBREWER = "textbrewer==0.2.1"
SIDES = ("ours", "textbrewer")
RESULT_FILE = "bench.json"


# ----- what both sides run ----------------------------------------------------------------------------------------
def bench_config(recipe: Path, teacher: str, steps: int, run_dir: Path, overrides: list[str] = ()) -> DistillConfig:
    """The recipe as both sides run it (checked to be one TextBrewer can match), with `overrides` for our side, which
    may change how the work is done (precision, cached teacher logits) but not the losses."""
    argv = ["--config", str(recipe), f"teacher={teacher}", f"output_dir={run_dir}",
            f"train.max_steps_per_stage={steps}", "train.select_best=false"]
    shared = parse_args(DistillConfig, argv)
    matched_losses(shared)
    cfg = parse_args(DistillConfig, argv + list(overrides))
    if cfg.stages != shared.stages:
        raise ConfigError(f"--ours {' '.join(overrides)} changes the losses or stages: the work would not be the same")
    return cfg


def matched_losses(cfg: DistillConfig) -> tuple[StageConfig, LossConfig, Optional[LossConfig]]:
    """The recipe's one stage with its `kl` and (if any) `ce` loss, or why TextBrewer's BasicDistiller cannot run the
    same recipe."""
    problems = []
    if len(cfg.stages) != 1:
        problems.append(f"it has {len(cfg.stages)} stages, not one")
    losses = {loss.name: loss for loss in cfg.stages[0].losses}
    if "kl" not in losses or set(losses) - {"kl", "ce"} or len(losses) != len(cfg.stages[0].losses):
        problems.append(f"its losses are {[loss.name for loss in cfg.stages[0].losses]}, not kl and optionally ce")
    if any(loss.schedule != "constant" for loss in cfg.stages[0].losses):
        problems.append("a loss weight or temperature follows a schedule")
    if cfg.extra_teachers or cfg.generations != 1 or cfg.mutual.peers:
        problems.append("it uses several teachers, generations or peer students")
    if cfg.train.gradient_accumulation_steps != 1 or cfg.train.mixed_precision != "no":
        problems.append("it accumulates gradients or trains in mixed precision")
    if problems:
        raise ConfigError("TextBrewer's BasicDistiller cannot run this recipe identically: " + "; ".join(problems))
    return cfg.stages[0], losses["kl"], losses.get("ce")


# ----- measured in each worker process ----------------------------------------------------------------------------
class StepClock:
    """The end time of every optimizer step of this process, a fingerprint of the parameters that the first step
    starts from, and the peak resident memory when the last step ends. It uses torch's global optimizer hooks, so it
    sees inside either training loop without changing it."""

    def __init__(self):
        self.times: list[float] = []
        self.initial_sha256: Optional[str] = None
        self.peak_rss_mb = 0.0
        register_optimizer_step_pre_hook(self._before_step)
        register_optimizer_step_post_hook(self._after_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.initial_sha256 is None:
            self.initial_sha256 = parameters_sha256(p for group in optimizer.param_groups for p in group["params"])

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.times.append(time.perf_counter())
        self.peak_rss_mb = resident_peak_mb()


def parameters_sha256(parameters: Iterable[torch.Tensor]) -> str:
    """Over the parameters' shapes and values, in no particular order: the two loops group them differently."""
    digests = []
    for param in parameters:
        tensor = param.detach().cpu().contiguous()
        digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
        digests.append(digest.hexdigest())
    return text_sha256("".join(sorted(digests)))


def train_ours(cfg: DistillConfig) -> float:
    from distill.encoder.job import distill

    return distill(cfg).metrics["test_accuracy"]


def train_textbrewer(cfg: DistillConfig) -> float:
    import textbrewer  # only in the bench environment
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from distill.core.data import collator
    from distill.core.evaluate import accuracy
    from distill.core.run import load_task
    from distill.core.trainer import RankTrace, param_groups, planned_batches, train_sampler
    from distill.encoder.single import build_distill_student, load_teacher

    stage, kl, ce = matched_losses(cfg)
    steps, train = cfg.train.max_steps_per_stage, cfg.train
    set_seed(cfg.seed)  # as distill.core.run.start_run does before loading anything
    task = load_task(cfg.data, cfg.teacher)
    teacher = load_teacher(cfg, task)
    student, _ = build_distill_student(cfg, cfg.student, teacher, task)
    train_set = task.splits["train"]
    batches = planned_batches(train_sampler(train_set, train, cfg.seed), train.batch_size, steps)
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collator(task.tokenizer))
    trace = RankTrace.from_env(0)

    def plain_dict(batch):
        # TextBrewer calls model(**batch) only for an exact dict; a tokenizer's BatchEncoding it would pass positionally
        trace.record_batch(batch)
        return dict(batch)

    distiller = textbrewer.BasicDistiller(
        textbrewer.TrainingConfig(device="cpu", output_dir=cfg.output_dir, ckpt_steps=steps),
        textbrewer.DistillationConfig(temperature=kl.temperature, kd_loss_type="ce",
                                      kd_loss_weight=kl.weight * kl.temperature ** 2,
                                      hard_label_weight=ce.weight if ce else 0.0),
        teacher, student, logits_and_label_loss, logits_and_label_loss)
    optimizer = torch.optim.AdamW(param_groups(student, train.weight_decay), lr=stage.learning_rate)
    schedule = {"name": train.lr_scheduler, "num_warmup_steps": round(train.warmup_ratio * steps),
                "num_training_steps": steps}
    with distiller:  # teacher in eval mode, student in train mode
        distiller.train(optimizer, loader, num_steps=steps, scheduler_class=get_scheduler, scheduler_args=schedule,
                        max_grad_norm=train.max_grad_norm, batch_postprocessor=plain_dict)
    trace.write(student)
    test_loader = DataLoader(task.splits["test"], train.eval_batch_size, collate_fn=collator(task.tokenizer))
    return accuracy(student, test_loader, Accelerator())


def logits_and_label_loss(batch, outputs) -> dict:
    """TextBrewer's adaptor: the logits to distil, and the model's cross-entropy on the labels (its hard-label loss)."""
    return {"logits": outputs.logits, "losses": outputs.loss}


def work(side: str, cfg: DistillConfig, threads: int) -> dict:
    """Run one side in this process and return what the parent compares."""
    from distill.core.trainer import RankTrace

    torch.set_num_threads(threads)
    RankTrace.batches_kept = cfg.train.max_steps_per_stage  # every batch, not the usual first few
    clock = StepClock()
    test_accuracy = (train_ours if side == "ours" else train_textbrewer)(cfg)
    trace = json.loads(Path(os.environ["DISTILL_RANK_TRACE"], "rank-0.json").read_text())
    step_seconds = [end - start for start, end in zip(clock.times, clock.times[1:])]
    return {"side": side, "steps": len(clock.times), "step_seconds": step_seconds,
            "initial_weights_sha256": clock.initial_sha256, "batches_sha256": text_sha256(json.dumps(trace["batches"])),
            "test_accuracy": test_accuracy, "peak_rss_mb": clock.peak_rss_mb, "threads": torch.get_num_threads()}


# ----- the parent: environments, processes, summary ----------------------------------------------------------------
def textbrewer_python() -> Path:
    """The bench environment's interpreter, with TextBrewer importable; created on first use. TextBrewer's other
    dependencies (torch, numpy, tqdm) are shared; it imports torch.utils.tensorboard, hence tensorboard."""
    return peer_environment(BENCH_ENV, TEXTBREWER, "import textbrewer", extras=[("tensorboard", "tensorboard")])


def run_side(side: str, python: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """One side in a fresh process, its output in `run_dir` (emptied first) and its log beside it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "DISTILL_RANK_TRACE": str(run_dir / "trace")}
    command = [str(python), str(Path(__file__).resolve()), "--worker", side, "--run-dir", str(run_dir),
               "--recipe", str(args.recipe), "--teacher", args.teacher, "--steps", str(args.steps),
               "--threads", str(args.threads), *(f"--ours={item}" for item in args.ours if side == "ours")]
    log = run_dir.with_name(run_dir.name + ".log")
    print(f"running {side} in {run_dir} (log: {log})", file=sys.stderr)
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"the {side} run failed (exit {done.returncode}); end of {log}:\n{tail}")
    return json.loads((run_dir / RESULT_FILE).read_text())


def steps_per_second(step_seconds: list[float], warmup: int, statistic=statistics.median) -> float:
    timed = step_seconds[warmup:]
    return 1 / statistic(timed)


def summarize(results: list[dict], warmup: int, steps: int) -> dict:
    """Per side: the median over repeats of each measure; and whether the runs did the same work."""
    sides = {}
    for side in SIDES:
        runs = [r for r in results if r["side"] == side]
        sides[side] = {
            "steps_per_second": statistics.median(steps_per_second(r["step_seconds"], warmup) for r in runs),
            "overall_steps_per_second": statistics.median(
                steps_per_second(r["step_seconds"], warmup, statistics.mean) for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
            "test_accuracies": [r["test_accuracy"] for r in runs],
        }
    return {
        "steps": steps, "warmup_steps": warmup, "repeats": len(results) // len(SIDES), "sides": sides,
        "ratio": sides["ours"]["steps_per_second"] / sides["textbrewer"]["steps_per_second"],
        "same_initial_weights": len({r["initial_weights_sha256"] for r in results}) == 1,
        "same_batches": len({r["batches_sha256"] for r in results}) == 1,
        "all_steps_run": all(r["steps"] == steps for r in results),
        "runs": results,
    }


def markdown(summary: dict) -> str:
    ours, theirs = summary["sides"]["ours"], summary["sides"]["textbrewer"]

    def row(name: str, key: str, fmt: str, scale: float = 1.0, ratio: bool = True) -> str:
        quotient = f"{ours[key] / theirs[key]:.2f}x" if ratio else "-"
        return f"| {name} | {fmt.format(scale * ours[key])} | {fmt.format(scale * theirs[key])} | {quotient} |"

    checks = {True: "yes", False: "NO"}
    return "\n".join([
        "| | ours (distill) | TextBrewer 0.2.1 | ours / TextBrewer |", "|---|---|---|---|",
        row(f"steps/s, median after {summary['warmup_steps']} warm-up steps", "steps_per_second", "{:.2f}"),
        row("steps/s, all steps after warm-up", "overall_steps_per_second", "{:.2f}"),
        row("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        row(f"test accuracy after {summary['steps']} steps (%)", "test_accuracy", "{:.2f}", scale=100, ratio=False),
        "",
        f"{summary['repeats']} repeat(s), medians over repeats. Our side's overrides: "
        f"{', '.join(summary.get('ours_overrides') or ['none'])}. Same initial student weights: "
        f"{checks[summary['same_initial_weights']]}; same batches in the same order: "
        f"{checks[summary['same_batches']]}; every run made {summary['steps']} optimizer steps: "
        f"{checks[summary['all_steps_run']]}.",
    ])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/teacher/model")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "distill_response.yaml")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps of each run; at most the recipe's epochs (3 x 187 steps for Rotten "
                             "Tomatoes). Past one epoch our side also validates and checkpoints inside the timed loop")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating which goes first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads of each run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-textbrewer"), help="folder of the runs")
    parser.add_argument("--json", type=Path, help="also write the summary and every run's measurements here")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for our side only, such as train.cache_teacher_logits=true or "
                             "train.teacher_dtype=bfloat16: what our framework offers to make the same work cheaper")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.worker:
            cfg = bench_config(args.recipe, args.teacher, args.steps, args.run_dir, args.ours)
            (args.run_dir / RESULT_FILE).write_text(json.dumps(work(args.worker, cfg, args.threads)))
            return
        if args.steps < args.warmup + 2:
            parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}: need at least "
                         f"{args.warmup + 2}")
        bench_config(args.recipe, args.teacher, args.steps, args.out, args.ours)  # what TextBrewer cannot match fails
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    pythons = {"ours": Path(sys.executable), "textbrewer": textbrewer_python()}
    results = []
    for repeat in range(args.repeats):
        for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
            results.append(run_side(side, pythons[side], args.out / f"{side}-{repeat}", args))
    summary = {**summarize(results, args.warmup, args.steps), "ours_overrides": args.ours}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    if not (summary["same_initial_weights"] and summary["same_batches"] and summary["all_steps_run"]):
        sys.exit("the runs did not do identical work (see above): the comparison does not hold")


if __name__ == "__main__":
    main()
