"""TRL's GKDTrainer against this project's online distillation, like for like: seconds per step, peak memory and (with
--eval) the test perplexity of both students.

    python scripts/bench_trl_gkd.py [--config recipes/distill_lm.yaml] [--steps 10 --warmup 2 --repeats 1] [--eval] \
        [--bf16] [key=value ...]

Both sides train the student that the config builds (saved once to a temporary folder; each side loads it from there,
so both start from the same weights) against the config's teacher, in float32 (with `--bf16`, float32 weights under
bfloat16 autocast on both sides: TRL's `bf16=True`, our `train.mixed_precision: bf16`), without gradient
checkpointing, on the same batches: the first batches of the config's train slice in the order this project's
Trainer draws them (TRL's sampler is made sequential over them), padded by the same collator. The loss is forward
KL(teacher || student) at T = 1, averaged over the real target tokens, and nothing else: TRL's
`trl.experimental.gkd.GKDTrainer` with lmbda = 0 (no generation by the student), beta = 0 (its generalized JSD is
then forward KL) and no seq_kd, and ours with the config's losses replaced by `forward_kl` of weight 1 (GKD has no CE
term; its `temperature` only reaches sampling, so its KL is at T = 1). Both use torch's AdamW at the config's
learning rate, weight decay (not on norms and biases), warm-up steps and schedule over the same number of steps, and
gradient clipping at the same norm.

Each side runs in a subprocess of its own; a step counts from the end of the optimizer step before it, after
`--warmup` untimed steps; the peak is the growth of the subprocess's resident peak from after imports to its last
step. Both report their loss at each step: with the same weights, batches and loss, the first step's losses agree.

TRL never becomes a dependency of the project: on first use the script makes a virtual environment of its own in
.bench-envs/trl, which sees the project environment's packages (torch, transformers, ...) through a .pth file and
holds only trl, installed without dependencies.

With `--cache`, a third side, `ours_cached`, trains the same student on the same batches with `topk_kl` (weight 1,
T = 1, tail bucket) read from a teacher cache instead of running the teacher: what the cache buys against TRL's
live teacher. Its loss is a different estimate of the same KL, so its losses are close to, not equal to, the others'."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_lm_step import run_variant  # sibling scripts: this script's folder is on sys.path
from lm_perplexity import measure
from transformers import TrainerCallback

from distill.benchmark import StepClock, peer_environment, rotated_order, run_probe, summarise
from distill.core.config import parse_args
from distill.core.errors import ConfigError
from distill.core.sources import corpus_tokens, ensure_pad_token, load_causal_lm, load_tokenizer
from distill.core.student import build_student
from distill.core.trainer import train_sampler
from distill.lm.config import LMDistillConfig
from distill.lm.data import LMCollator, held_out_splits
from distill.lm.job import check_lm_distill

ROOT = Path(__file__).resolve().parents[1]
TRL_ENV = ROOT / ".bench-envs" / "trl"
TRL_VERSION = "1.16.0"  # the newest 1.x on PyPI; trl.experimental.gkd and transformers 5 support since 1.0
SIDES = ("ours", "trl")
CACHED_SIDE = "ours_cached"
GKD_LOSS = "stages.0.losses=[{name: forward_kl, weight: 1.0, temperature: 1.0}]"
CACHED_LOSS = "stages.0.losses=[{name: topk_kl, weight: 1.0, temperature: 1.0}]"


# ----- the TRL environment ----------------------------------------------------------------------------------------
def trl_python() -> Path:
    """The Python of .bench-envs/trl (made on first use), with trl importable at the pinned version."""
    return peer_environment(TRL_ENV, f"trl=={TRL_VERSION}",
                            f"import trl, trl.experimental.gkd; assert trl.__version__ == '{TRL_VERSION}'")


# ----- what both sides share --------------------------------------------------------------------------------------
def bench_config(args, overrides: list[str], student_dir: str, run_dir: str = "unused", side: str = "ours"
                 ) -> LMDistillConfig:
    """The config with forward KL alone (for the cached side: top-k KL from `--cache`), the saved student, float32
    or bf16 autocast, log every step, no checkpoint before the end."""
    total = args.warmup + args.steps
    loss = [CACHED_LOSS, f"cache={args.cache}"] if side == CACHED_SIDE else [GKD_LOSS]
    cfg = parse_args(LMDistillConfig, ["--config", args.config, *overrides, *loss, f"output_dir={run_dir}",
                                       "student.init=pretrained", f"student.model={student_dir}",
                                       f"train.mixed_precision={'bf16' if args.bf16 else repr('no')}",
                                       f"train.max_steps_per_stage={total}",
                                       f"train.save_steps={total + 1}", "train.log_steps=1",
                                       "train.gradient_accumulation_steps=1"])
    check_lm_distill(cfg)
    if len(cfg.stages) != 1:
        raise ConfigError(f"the comparison runs one stage; {args.config} has {len(cfg.stages)}")
    return cfg


def save_initial_student(args, overrides: list[str], folder: Path) -> None:
    """The student the config builds from its teacher, with the teacher's tokenizer, saved to `folder`."""
    cfg = parse_args(LMDistillConfig, ["--config", args.config, *overrides])
    teacher = load_causal_lm(cfg.teacher)
    build_student(cfg.student, teacher, load_causal_lm).save_pretrained(folder)
    load_tokenizer(cfg.teacher).save_pretrained(folder)


def check_float32(**models) -> None:
    for name, model in models.items():
        dtypes = {str(param.dtype) for param in model.parameters()}
        if dtypes != {"torch.float32"}:
            raise RuntimeError(f"the {name} has parameters in {', '.join(sorted(dtypes))}, not float32 only")


# ----- our side ---------------------------------------------------------------------------------------------------
def run_ours(cfg: LMDistillConfig, total: int, warmup: int, keep_model: bool) -> dict:
    """`distill_lm`, stopped after its last step unless the student is to be evaluated (then saved in the run)."""
    result = run_variant(cfg, total, warmup, keep_going=keep_model)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {**result, "losses": [record["train_loss"] for record in records if "train_loss" in record]}


# ----- TRL's side -------------------------------------------------------------------------------------------------
class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock, self.losses = clock, []

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def first_batches_in_our_order(cfg: LMDistillConfig, tokenizer, steps: int):
    """The examples of our first `steps` batches, in the order our Trainer draws them (its first epoch)."""
    splits, _ = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    train = splits["train"]
    order = list(train_sampler(train, cfg.train, cfg.seed))[:steps * cfg.train.batch_size]
    if len(order) < steps * cfg.train.batch_size:
        raise ConfigError(f"the train slice holds {len(train)} texts, fewer than {steps} batches of "
                          f"{cfg.train.batch_size}: raise data.limit or lower --steps")
    return train.select(order)


def run_trl(cfg: LMDistillConfig, total: int, warmup: int, out_dir: Path, keep_model: bool) -> dict:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    clock = StepClock(total, warmup)
    tokenizer = ensure_pad_token(load_tokenizer(cfg.teacher))
    tokenizer.padding_side = "right"
    train = first_batches_in_our_order(cfg, tokenizer, total)
    teacher, student = load_causal_lm(cfg.teacher), load_causal_lm(cfg.student.model)
    check_float32(teacher=teacher, student=student)
    stage, train_cfg = cfg.stages[0], cfg.train
    gkd = GKDConfig(
        output_dir=str(out_dir), seed=cfg.seed, max_steps=total, per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=1, train_sampling_strategy="sequential",
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
        bf16=cfg.train.mixed_precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on CPU unless told
        optim="adamw_torch", learning_rate=stage.learning_rate, weight_decay=train_cfg.weight_decay,
        lr_scheduler_type=train_cfg.lr_scheduler, warmup_steps=round(train_cfg.warmup_ratio * total),
        max_grad_norm=train_cfg.max_grad_norm, max_length=cfg.data.max_length,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    callback = ClockCallback(clock)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gkd, data_collator=LMCollator(tokenizer),
                         train_dataset=train, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    if keep_model:
        trainer.save_model(str(out_dir / "model"))
    return {**clock.result(), "losses": callback.losses}


# ----- the comparison ---------------------------------------------------------------------------------------------
def markdown(summary: dict[str, dict], losses: dict[str, list[float]], perplexities: dict, args) -> str:
    ours = summary["ours"]
    lines = ["| trainer | s/step | steps/s | step time vs ours | peak RSS growth MB | peak vs ours | loss, step 1 | "
             f"loss, step {args.warmup + args.steps} | test ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for side, row in summary.items():
        ppl = perplexities.get(side, {}).get("test")
        lines.append(f"| {side} | {row['seconds_per_step']:.2f} | {row['steps_per_second']:.3f} | "
                     f"{row['seconds_per_step'] / ours['seconds_per_step']:.2f}x | {row['peak_rss_growth_mb']:.0f} | "
                     f"{row['peak_rss_growth_mb'] / ours['peak_rss_growth_mb']:.2f}x | {losses[side][0]:.4f} | "
                     f"{losses[side][-1]:.4f} | {'-' if ppl is None else f'{ppl:.2f}'} |")
    first = losses["ours"][0], losses["trl"][0]
    lines.append(f"\nMedians of {args.repeats} run(s) per side, {args.steps} timed steps each after {args.warmup} "
                 "warm-up steps; losses from the last run of each side. The first step's losses (same weights, batch "
                 f"and loss) differ by {abs(first[0] - first[1]) / abs(first[0]):.1e}, relative.")
    return "\n".join(lines)


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/distill_lm.yaml", help="an online LM distillation config")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, in alternation")
    parser.add_argument("--eval", action="store_true", help="also the test perplexity of both students after the "
                                                            "steps (of the last run of each side)")
    parser.add_argument("--json", type=Path, help="also write every run's step times and losses here")
    parser.add_argument("--bf16", action="store_true", help="both sides under bfloat16 autocast (TRL's default)")
    parser.add_argument("--cache", help="a teacher cache of the config's corpus (recipes/build_teacher_cache.py): adds "
                                        f"'{CACHED_SIDE}', our run on top-k KL read from it, no teacher run")
    parser.add_argument("--side", choices=(*SIDES, CACHED_SIDE), help=argparse.SUPPRESS)  # run one side, in this process
    parser.add_argument("--student-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--keep-model", action="store_true", help=argparse.SUPPRESS)  # save the trained student
    args, overrides = parser.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return parser, args, overrides


def run_side(args, overrides: list[str]) -> dict:
    run_dir = Path(args.run_dir)
    cfg = bench_config(args, overrides, args.student_dir, str(run_dir / "run"), args.side)
    total = args.warmup + args.steps
    if args.side == "trl":
        return run_trl(cfg, total, args.warmup, run_dir, args.keep_model)
    return run_ours(cfg, total, args.warmup, args.keep_model)


def main(argv: list[str]) -> None:
    parser, args, overrides = parse(argv)
    if args.side:
        print(json.dumps(run_side(args, overrides)))
        return
    try:
        cfg = bench_config(args, overrides, "unused")
    except ConfigError as err:
        parser.error(str(err))
    sides = (*SIDES, CACHED_SIDE) if args.cache else SIDES
    pythons = {"ours": sys.executable, "trl": str(trl_python()), CACHED_SIDE: sys.executable}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bench-trl-gkd-") as tmp:
        student_dir = Path(tmp) / "student"
        save_initial_student(args, overrides, student_dir)
        model_dirs = {}
        order = rotated_order(list(sides), args.repeats)
        for i, side in enumerate(order):
            run_dir = Path(tmp) / f"{side}-{i}"
            last_of_side = side not in order[i + 1:]
            command = [pythons[side], __file__, *argv, "--side", side, "--student-dir", str(student_dir),
                       "--run-dir", str(run_dir), *(["--keep-model"] if args.eval and last_of_side else [])]
            runs[side].append(run_probe(command, env={"PYTHONPATH": str(ROOT)}))
            model_dirs[side] = run_dir / ("model" if side == "trl" else "run/model")
            print(f"{side}: median step {statistics.median(runs[side][-1]['step_seconds']):.2f} s, "
                  f"peak +{runs[side][-1]['peak_rss_growth_mb']:.0f} MB", file=sys.stderr)
        perplexities = measure(cfg, {side: load_causal_lm(str(folder)) for side, folder in model_dirs.items()}) \
            if args.eval else {}
    summary = {side: summarise(side_runs) for side, side_runs in runs.items()}
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs, "perplexity": perplexities}, indent=2))
    print(markdown(summary, {side: side_runs[-1]["losses"] for side, side_runs in runs.items()}, perplexities, args))


if __name__ == "__main__":
    main(sys.argv[1:])
