"""Run distillation recipes over several seeds and report mean and spread of test accuracy, as a share of the
teacher's. Each run is a separate process (`recipes/distill_student.py`); finished runs are reused, so an
interrupted study resumes.

    python scripts/seed_study.py --recipes recipes/distill_tinybert.yaml recipes/distill_hard_labels.yaml \
        --seeds 0 1 2 --parallel 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(recipe: Path, seed: int, out: Path, threads: int, overrides: list[str]) -> dict:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(ROOT / "recipes" / "distill_student.py"), "--config", str(recipe),
               f"seed={seed}", f"output_dir={out}", *overrides]
        with (out.parent / f"{out.name}.log").open("w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def summarize(name: str, accuracies: list[float], teacher: float) -> dict:
    return {
        "recipe": name, "runs": len(accuracies), "accuracies": accuracies,
        "mean": statistics.mean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "spread": max(accuracies) - min(accuracies), "kept": statistics.mean(accuracies) / teacher,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher-metrics", type=Path, default=Path("runs/teacher/metrics.json"))
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (CPU threads are split between them)")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run, e.g. stages.0.epochs=4")
    args = parser.parse_args()
    if not args.teacher_metrics.is_file():
        parser.error(f"{args.teacher_metrics} not found: fine-tune the teacher first")
    teacher = json.loads(args.teacher_metrics.read_text())["test_accuracy"]
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = [(r, s, args.out / f"{r.stem}-seed{s}") for r in args.recipes for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(*job, threads, args.overrides), jobs))
    summaries = []
    for recipe in args.recipes:
        accs = [m["test_accuracy"] for (r, _, _), m in zip(jobs, results) if r == recipe]
        summaries.append(summarize(recipe.stem, accs, teacher))
    (args.out / "summary.json").write_text(json.dumps({"teacher_test_accuracy": teacher, "recipes": summaries}, indent=2))
    print(f"teacher test accuracy: {100 * teacher:.2f}")
    print("| recipe | seeds | test acc. mean | std | min..max | kept of teacher |\n|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['recipe']} | {s['runs']} | {100 * s['mean']:.2f} | {100 * s['std']:.2f} | "
              f"{100 * min(s['accuracies']):.2f}..{100 * max(s['accuracies']):.2f} | {100 * s['kept']:.1f}% |")


if __name__ == "__main__":
    main()
