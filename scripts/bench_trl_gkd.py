"""TRL's GKDTrainer against this project's online distillation, like for like: seconds per step, peak memory and (with
--eval) the test perplexity of both students.

    python scripts/bench_trl_gkd.py [--config recipes/distill_lm.yaml] [--steps 10 --warmup 2 --repeats 1] [--eval] \
        [--bf16] [--lmbda 0 --beta 0] [key=value ...]
    python scripts/bench_trl_gkd.py --config recipes/distill_lm_on_policy.yaml --lmbda 0.5 --beta 0.5 \
        --steps 4 --warmup 1 --repeats 2

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
step. Both report their loss at each step: with the same weights, batches and loss (and `--lmbda 0`), the first
step's losses agree.

TRL never becomes a dependency of the project: on first use the script makes a virtual environment of its own in
.bench-envs/trl, which sees the project environment's packages (torch, transformers, ...) through a .pth file and
holds only trl, installed without dependencies.

With `--cache`, a third side, `ours_cached`, trains the same student on the same batches with `topk_kl` (weight 1,
T = 1, tail bucket) read from a teacher cache instead of running the teacher: what the cache buys against TRL's
live teacher. Its loss is a different estimate of the same KL, so its losses are close to, not equal to, the others'.

`--beta B` (default 0) makes the loss GKD's generalized JSD with that beta on both sides: TRL's `beta=B`, ours `jsd`
with `beta: B` (T = 1). At 0 and 1 both compute forward and reverse KL exactly; in between ours is TRL's
`generalized_jsd_loss` divided by B (1 - B) (continuous in beta), so the losses differ by that constant factor, which
the first-step comparison takes out.

`--lmbda X` (default 0: no generation, as above) is the on-policy mode; it needs a config with prompts (`data.format`
prompt_completion or chat, such as recipes/distill_lm_on_policy.yaml). Each training batch, with chance X, is
replaced by the student's own completions of its prompts, sampled at the config's `on_policy.temperature` (top-p 1)
for up to `on_policy.max_new_tokens` tokens, which the teacher then scores: ours with `on_policy.lmbda: X` and the
config's other `on_policy` settings, TRL's `GKDConfig(lmbda=X, beta=B, temperature=..., max_new_tokens=...,
seq_kd=False)`. `GKDTrainer.training_step` reads each batch's `prompts` and `prompt_attention_mask` (left-padded:
`generate_on_policy_outputs` takes the completion as the columns after the prompt batch's width), so TRL's collator is
ours with those two added, built from each example's `prompt_length`; the batches are the same, in the same order.
Each side draws its own coins (ours from a generator seeded per batch, TRL's from Python's `random` seeded by the
Trainer) and its own samples: which steps go on-policy, and the losses, are not comparable step by step (nor
normalised alike: on an on-policy batch TRL divides the summed loss by the data batch's target count, the Trainer's
`num_items_in_batch`, counted before `training_step` replaces the batch; ours by the sampled tokens'). The table
counts, per side, the timed steps that were on-policy, the medians of on-policy and data steps apart (pooled over the
runs) and the mean longest completion per on-policy batch (what sets the number of decoding steps)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from transformers import TrainerCallback

from benchmarks.harness import StepClock, peer_environment, ratio, rotated_order, summarise
from benchmarks.lm import measure, run_variant
from distill.core.config import parse_args
from distill.core.data import corpus_tokens
from distill.core.errors import ConfigError
from distill.core.models import ensure_pad_token, load_causal_lm, load_tokenizer
from distill.core.probe import run_probe
from distill.core.student import build_student
from distill.core.trainer import train_sampler
from distill.lm.config import LMDistillConfig
from distill.lm.data import PROMPT_LENGTH, LMCollator, held_out_splits
from distill.lm.job import check_lm_distill
from distill.lm.on_policy import OnPolicyBatches

ROOT = Path(__file__).resolve().parents[1]
TRL_ENV = ROOT / ".bench-envs" / "trl"
TRL_VERSION = "1.16.0"  # the newest 1.x on PyPI; trl.experimental.gkd and transformers 5 support since 1.0
SIDES = ("ours", "trl")
CACHED_SIDE = "ours_cached"
CACHED_LOSS = "stages.0.losses=[{name: topk_kl, weight: 1.0, temperature: 1.0}]"


def gkd_loss(beta: float) -> str:
    """Our loss for TRL's generalized JSD at `beta`: forward KL at 0 (as before the on-policy mode), else `jsd`."""
    if beta == 0:
        return "stages.0.losses=[{name: forward_kl, weight: 1.0, temperature: 1.0}]"
    return f"stages.0.losses=[{{name: jsd, weight: 1.0, temperature: 1.0, beta: {beta!r}}}]"


# ----- the TRL environment ----------------------------------------------------------------------------------------
def trl_python() -> Path:
    """The Python of .bench-envs/trl (made on first use), with trl importable at the pinned version."""
    return peer_environment(TRL_ENV, f"trl=={TRL_VERSION}",
                            f"import trl, trl.experimental.gkd; assert trl.__version__ == '{TRL_VERSION}'")


# ----- what both sides share --------------------------------------------------------------------------------------
def bench_config(args, overrides: list[str], student_dir: str, run_dir: str = "unused", side: str = "ours"
                 ) -> LMDistillConfig:
    """The config with GKD's loss alone (forward KL, or `jsd` with `--beta`; for the cached side: top-k KL from
    `--cache`), `on_policy.lmbda` from `--lmbda`, the saved student, float32 or bf16 autocast, log every step, no
    checkpoint before the end."""
    total = args.warmup + args.steps
    loss = [CACHED_LOSS, f"cache={args.cache}"] if side == CACHED_SIDE else [gkd_loss(args.beta)]
    cfg = parse_args(LMDistillConfig, ["--config", args.config, *overrides, *loss, f"output_dir={run_dir}",
                                       f"on_policy.lmbda={args.lmbda!r}",
                                       "student.init=pretrained", f"student.model={student_dir}", "student.layers=null",
                                       f"train.mixed_precision={'bf16' if args.bf16 else repr('no')}",
                                       f"train.max_steps_per_stage={total}",
                                       f"train.save_steps={total + 1}", "train.log_steps=1",
                                       "train.gradient_accumulation_steps=1"])
    if args.lmbda > 0:
        check_on_policy_like_trl(cfg, args.config)
    check_lm_distill(cfg)
    if len(cfg.stages) != 1:
        raise ConfigError(f"the comparison runs one stage; {args.config} has {len(cfg.stages)}")
    return cfg


def check_on_policy_like_trl(cfg: LMDistillConfig, config: str) -> None:
    """What TRL's on-policy step can match: prompts to complete, and sampling at a temperature over all tokens."""
    if cfg.data.format == "text":
        raise ConfigError(f"--lmbda > 0: the student completes prompts, and {config} has data.format text; use a "
                          "prompt_completion or chat config (recipes/distill_lm_on_policy.yaml)")
    policy = cfg.on_policy
    if policy.temperature <= 0 or policy.top_p != 1:
        raise ConfigError(f"--lmbda > 0: TRL samples (do_sample, top_k 0, top_p 1) at a temperature above 0; "
                          f"{config} has on_policy.temperature {policy.temperature}, top_p {policy.top_p}")


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
def longest_completion(labels: torch.Tensor) -> int:
    """The most target tokens of a row: in an on-policy batch, the tokens the longest completion took to sample."""
    return int((labels != -100).sum(1).max())


def run_ours(cfg: LMDistillConfig, total: int, warmup: int, keep_model: bool) -> dict:
    """`distill_lm`, stopped after its last step unless the student is to be evaluated (then saved in the run). With
    on-policy batches, each step's longest completion (0: the data's batch), noted by the batch transform itself."""
    sampled: list[int] = []

    class NotedBatches(OnPolicyBatches):
        def __call__(self, batch, state, student):
            before = self.counts["on_policy_batches"]
            batch = super().__call__(batch, state, student)
            sampled.append(longest_completion(batch["labels"]) if self.counts["on_policy_batches"] > before else 0)
            return batch

    with mock.patch("distill.lm.job.OnPolicyBatches", NotedBatches):
        result = run_variant(cfg, total, warmup, keep_going=keep_model)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {**result, "losses": [record["train_loss"] for record in records if "train_loss" in record],
            **({"sampled_tokens": sampled[:total]} if cfg.on_policy.lmbda > 0 else {})}


# ----- TRL's side -------------------------------------------------------------------------------------------------
class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock, self.losses = clock, []

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class PromptCollator:
    """Our `LMCollator`'s batch plus what `GKDTrainer.training_step` hands to `generate_on_policy_outputs`: each
    example's prompt (its first `prompt_length` ids), left-padded as `prompts`, with `prompt_attention_mask`."""

    def __init__(self, tokenizer):
        self.lm, self.pad_id = LMCollator(tokenizer), tokenizer.pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.lm(features)
        prompts = [list(feature["input_ids"][:feature[PROMPT_LENGTH]]) for feature in features]
        width = max(len(prompt) for prompt in prompts)
        batch["prompts"] = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        batch["prompt_attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                                      dtype=torch.long)
        return batch


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
    stage, train_cfg, policy = cfg.stages[0], cfg.train, cfg.on_policy
    on_policy = policy.lmbda > 0
    gkd = GKDConfig(
        output_dir=str(out_dir), seed=cfg.seed, max_steps=total, per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=1, train_sampling_strategy="sequential",
        lmbda=policy.lmbda, beta=loss_beta(stage), seq_kd=False,
        temperature=policy.temperature if on_policy else 1.0,
        **({"max_new_tokens": policy.max_new_tokens} if on_policy else {}),
        bf16=cfg.train.mixed_precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on CPU unless told
        optim="adamw_torch", learning_rate=stage.learning_rate, weight_decay=train_cfg.weight_decay,
        lr_scheduler_type=train_cfg.lr_scheduler, warmup_steps=round(train_cfg.warmup_ratio * total),
        max_grad_norm=train_cfg.max_grad_norm, max_length=cfg.data.max_length,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    callback = ClockCallback(clock)
    collator = PromptCollator(tokenizer) if on_policy else LMCollator(tokenizer)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gkd, data_collator=collator,
                         train_dataset=train, processing_class=tokenizer, callbacks=[callback])
    sampled = [0] * total
    generate = trainer.generate_on_policy_outputs  # a staticmethod: the instance attribute below shadows it

    def noted_generate(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        if len(clock.ends) < total:  # the step under way: as many steps have ended
            sampled[len(clock.ends)] = longest_completion(labels)
        return ids, mask, labels

    trainer.generate_on_policy_outputs = noted_generate
    trainer.train()
    if keep_model:
        trainer.save_model(str(out_dir / "model"))
    return {**clock.result(), "losses": callback.losses, **({"sampled_tokens": sampled} if on_policy else {})}


def loss_beta(stage) -> float:
    """TRL's beta for our stage's one loss (forward KL: 0)."""
    loss = stage.losses[0]
    return loss.beta if loss.name == "jsd" else 0.0


# ----- the comparison ---------------------------------------------------------------------------------------------
def markdown(summary: dict[str, dict], losses: dict[str, list[float]], perplexities: dict, args,
             on_policy: dict[str, dict] | None = None) -> str:
    ours = summary["ours"]
    lines = ["| trainer | s/step | steps/s | step time vs ours | peak RSS growth MB | peak vs ours | loss, step 1 | "
             f"loss, step {args.warmup + args.steps} | test ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for side, row in summary.items():
        ppl = perplexities.get(side, {}).get("test")
        lines.append(f"| {side} | {row['seconds_per_step']:.2f} | {row['steps_per_second']:.3f} | "
                     f"{row['seconds_per_step'] / ours['seconds_per_step']:.2f}x | {row['peak_rss_growth_mb']:.0f} | "
                     f"{ratio(row['peak_rss_growth_mb'], ours['peak_rss_growth_mb'])} | {losses[side][0]:.4f} | "
                     f"{losses[side][-1]:.4f} | {'-' if ppl is None else f'{ppl:.2f}'} |")
    note = (f"\nMedians of {args.repeats} run(s) per side, {args.steps} timed steps each after {args.warmup} "
            "warm-up steps; losses from the last run of each side.")
    scale = args.beta * (1 - args.beta)  # ours is TRL's generalized JSD divided by this (0 < beta < 1)
    if args.lmbda > 0:
        lines.append(note + f" On-policy (lmbda {args.lmbda:g}, beta {args.beta:g}): each side draws its own coins "
                     "and samples, so its losses are on batches of its own and not comparable step by step"
                     + (f"; ours is TRL's generalized JSD divided by beta (1 - beta) = {scale:g}." if scale else "."))
        lines += ["", "| trainer | on-policy steps (timed, all runs) | s/on-policy step | s/data step | "
                  "longest completion per on-policy batch, tokens |", "|---|---|---|---|---|"]
        for side, split in on_policy.items():
            longest = "-" if split["mean_longest"] is None else f"{split['mean_longest']:.1f}"
            lines.append(f"| {side} | {split['on_policy']}/{split['timed']} | {seconds(split['on_policy_seconds'])} | "
                         f"{seconds(split['data_seconds'])} | {longest} |")
        lines.append("\nStep medians pooled over the runs' timed steps of each kind; longest completion: the mean "
                     "over the timed on-policy steps.")
        return "\n".join(lines)
    first = losses["ours"][0] * (scale or 1.0), losses["trl"][0]
    scaled = f" (ours times beta (1 - beta) = {scale:g})" if scale else ""
    lines.append(note + f" The first step's losses (same weights, batch and loss){scaled} differ by "
                 f"{abs(first[0] - first[1]) / abs(first[0]):.1e}, relative.")
    return "\n".join(lines)


def seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def on_policy_split(side_runs: list[dict], warmup: int) -> dict:
    """A side's timed steps over all its runs: how many were on-policy, their times and the data steps' apart, and
    the mean longest completion of the on-policy ones."""
    on, data, longest = [], [], []
    for run in side_runs:
        for tokens, step in zip(run["sampled_tokens"][warmup:], run["step_seconds"]):
            (on if tokens else data).append(step)
            if tokens:
                longest.append(tokens)
    return {"timed": len(on) + len(data), "on_policy": len(on), "on_policy_seconds": on, "data_seconds": data,
            "mean_longest": statistics.mean(longest) if longest else None}


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
    parser.add_argument("--lmbda", type=float, default=0.0, help="the share of batches the student completes itself "
                                                                   "(GKD's lambda; > 0 needs a config with prompts)")
    parser.add_argument("--beta", type=float, default=0.0, help="GKD's generalized JSD beta (0: forward KL, 1: "
                                                                "reverse KL)")
    parser.add_argument("--side", choices=(*SIDES, CACHED_SIDE), help=argparse.SUPPRESS)  # run one side, in this process
    parser.add_argument("--student-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--keep-model", action="store_true", help=argparse.SUPPRESS)  # save the trained student
    args, overrides = parser.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    if not (0 <= args.lmbda <= 1 and 0 <= args.beta <= 1):
        parser.error(f"--lmbda and --beta are in [0, 1]; got {args.lmbda:g} and {args.beta:g}")
    if args.cache and (args.lmbda or args.beta):
        parser.error("--cache compares top-k forward KL read from a cache: only with --lmbda 0 --beta 0")
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
    split = {side: on_policy_split(side_runs, args.warmup) for side, side_runs in runs.items()} if args.lmbda else None
    print(markdown(summary, {side: side_runs[-1]["losses"] for side, side_runs in runs.items()}, perplexities, args,
                   split))


if __name__ == "__main__":
    main(sys.argv[1:])
