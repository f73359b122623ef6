"""Memory per process of a two-process causal-LM distillation, side by side: data parallel (every process holds the
whole student, its gradients and optimizer state, and the teacher), `train.sharding: fsdp2` (the student's share
split), and fsdp2 with `teacher_placement: shard` (the teacher's too). Each run is launched with
recipes/accelerate/cpu_2proc.yaml for a few steps; reported per run: the bytes of weights, gradients, optimizer
state and teacher each process holds (the trainer's count, metrics.json), the peak resident memory of the largest
process, and how far its final weights are from the data-parallel run's.

    OMP_NUM_THREADS=1 python scripts/bench_sharding.py --config recipes/distill_lm.yaml --steps 3 \
        --out runs/bench-sharding
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"ddp": [], "fsdp2": ["train.sharding=fsdp2"],
            "fsdp2_teacher": ["train.sharding=fsdp2", "train.teacher_placement=shard"]}
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def launch(config: str, out: Path, overrides: list[str], steps: int, port: int) -> int:
    """Run one variant; the peak resident memory of its largest process, in kB."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port),
               str(REPO / "recipes" / "distill_lm.py"), "--config", config, f"output_dir={out}",
               f"train.max_steps_per_stage={steps}", "train.select_best=false", "validation_examples=8",
               "test_examples=8", "eval.max_new_tokens=4", "train.group_by_length=false", *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{out} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "distill_lm.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-sharding")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = parser.parse_args(argv)
    root = Path(args.out)
    results = {}
    for name, overrides in VARIANTS.items():
        peak_kb = launch(args.config, root / name, [*args.overrides, *overrides], args.steps, args.port)
        metrics = json.loads((root / name / "metrics.json").read_text())
        results[name] = {"held_bytes": metrics["memory_per_process_bytes"], "peak_rss_mb": peak_kb / 1024,
                         "test_perplexity": metrics["test_perplexity"]}
    reference = load_file(root / "ddp" / "model" / "model.safetensors")
    for name, result in results.items():
        weights = load_file(root / name / "model" / "model.safetensors")
        result["max_weight_difference_to_ddp"] = max((weights[key].float() - value.float()).abs().max().item()
                                                      for key, value in reference.items())
        result["held_vs_ddp"] = result["held_bytes"]["total"] / results["ddp"]["held_bytes"]["total"]
        result["peak_rss_vs_ddp"] = result["peak_rss_mb"] / results["ddp"]["peak_rss_mb"]
    text = json.dumps({"config": args.config, "steps": args.steps, "torch": torch.__version__,
                       "overrides": args.overrides, "results": results}, indent=2)
    (root / "results.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
