"""Run recipes over several seeds and report mean and spread of test accuracy, as a share of the teacher's.
Each run is a separate process of `--script`; finished runs are reused, so an interrupted study resumes.
A recipe may carry its own overrides after `@` (`recipe.yaml@key=value@key=value`), so variants of one recipe
can be compared in one table. Pruning runs also report the accuracy before recovery.

    python scripts/seed_study.py --recipes recipes/distill_tinybert.yaml recipes/distill_hard_labels.yaml \
        --seeds 0 1 2 --parallel 2
    python scripts/seed_study.py --script recipes/prune_model.py --out runs/prune-study \
        --recipes recipes/prune_heads_ffn.yaml@ffn.fraction=0@importance.criterion=random --seeds 0 1 2
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


def variant_name(recipe: str) -> str:
    """The recipe's stem and its overrides, usable as one folder name (a `/` in a value becomes `_`)."""
    path, *overrides = recipe.split("@")
    return "@".join([Path(path).stem, *overrides]).replace("/", "_")


def run_one(script: Path, recipe: str, seed: int, out: Path, threads: int, overrides: list[str]) -> dict:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        path, *own = recipe.split("@")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(script), "--config", path, f"seed={seed}", f"output_dir={out}", *own, *overrides]
        with (out.parent / f"{out.name}.log").open("w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def summarize(name: str, runs: list[dict], teacher: float) -> dict:
    summary = {"recipe": name, "runs": len(runs), **spread([m["test_accuracy"] for m in runs])}
    summary["kept"] = summary["mean"] / teacher
    before = [m["test_accuracy_before_recovery"] for m in runs if m.get("test_accuracy_before_recovery") is not None]
    if before:
        summary["before_recovery"] = spread(before)
    for key in ("parameters", "disk_mb"):
        if key in runs[0]:
            summary[key] = runs[0][key]
    return summary


def spread(accuracies: list[float]) -> dict:
    return {"accuracies": accuracies, "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}


def percent(values: dict) -> str:
    return f"{100 * values['mean']:.2f} ± {100 * values['std']:.2f}"


def markdown(summaries: list[dict], teacher: float) -> str:
    lines = [f"teacher test accuracy: {100 * teacher:.2f}",
             "| recipe | seeds | test acc. (mean ± std) | min..max | kept of teacher | before recovery | params | disk MB |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        before = percent(s["before_recovery"]) if "before_recovery" in s else "-"
        params = f"{s['parameters'] / 1e6:.1f}M" if "parameters" in s else "-"
        disk = f"{s['disk_mb']:.1f}" if "disk_mb" in s else "-"
        lines.append(f"| {s['recipe']} | {s['runs']} | {percent(s)} | {100 * min(s['accuracies']):.2f}.."
                     f"{100 * max(s['accuracies']):.2f} | {100 * s['kept']:.1f}% | {before} | {params} | {disk} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", required=True, help="recipe YAMLs, each optionally @key=value...")
    parser.add_argument("--script", type=Path, default=ROOT / "recipes" / "distill_student.py")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher-metrics", type=Path, default=Path("runs/teacher/metrics.json"))
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (CPU threads are split between them)")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run, e.g. stages.0.epochs=4")
    args = parser.parse_args(argv)
    if not args.teacher_metrics.is_file():
        parser.error(f"{args.teacher_metrics} not found: fine-tune the teacher first")
    teacher = json.loads(args.teacher_metrics.read_text())["test_accuracy"]
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = [(r, s, args.out / f"{variant_name(r)}-seed{s}") for r in args.recipes for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(args.script, *job, threads, args.overrides), jobs))
    summaries = [summarize(variant_name(recipe), [m for (r, _, _), m in zip(jobs, results) if r == recipe], teacher)
                 for recipe in args.recipes]
    (args.out / "summary.json").write_text(json.dumps({"teacher_test_accuracy": teacher, "recipes": summaries}, indent=2))
    print(markdown(summaries, teacher))


if __name__ == "__main__":
    main(sys.argv[1:])
