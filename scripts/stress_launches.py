"""Every two-process CPU (gloo) launch the tests use, run back to back many times, counting the launches that fail
or hang: the sharded causal-LM run (FSDP2; teacher sharded, or
replicated in bfloat16), the sharded encoder run, the data-parallel encoder run
and a teacher-cache build. `--parallel 2` runs two loops side by side, so both cores stay loaded, as in CI under load.

    python scripts/stress_launches.py --repeats 30 --parallel 2 --out runs/stress

Prints one row per launch kind (launches, failures, hangs, median seconds) and writes each failure's output into
`--out/failures/`. Exit status 1 if any launch failed."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import launch_bounded, save_tiny_teacher, write_sentiment_csv  # noqa: E402
from tests.helpers.lm_runs import WORDS, save_lm  # noqa: E402

KINDS = ("sharded_lm", "sharded_lm_bf16_teacher", "sharded_encoder", "data_parallel_encoder", "cache_build")


def assets(folder: Path) -> dict[str, Path]:
    """The tiny models and data every launch reads, built once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(80)) + "\n")
    return {"lm": save_lm(folder / "lm-teacher", WORDS), "corpus": corpus,
            "encoder": save_tiny_teacher(folder / "encoder-teacher"),
            "csv": write_sentiment_csv(folder / "sentiment.csv")}


def launch_args(kind: str, files: dict[str, Path], out: Path) -> tuple[str, list[str]]:
    """The recipe and its arguments for one launch of `kind` writing into `out`."""
    if kind == "cache_build":
        return "build_teacher_cache.py", [f"teacher={files['lm']}", f"data.source={files['corpus']}",
                                          "data.max_length=12", "k=3", "samples=2", "shard_examples=8",
                                          "batch_size=4", f"output_dir={out}"]
    train = {"batch_size": 4, "eval_batch_size": 8, "max_steps_per_stage": 4, "save_steps": 2, "log_steps": 1,
             "group_by_length": False}
    if kind.startswith("sharded"):
        train.update(sharding="fsdp2", teacher_placement="shard")
    if kind == "sharded_lm_bf16_teacher":  # the student sharded, a bfloat16 teacher replicated
        train.update(teacher_placement="replicate", teacher_dtype="bfloat16")
    if kind.startswith("sharded_lm"):
        values = {"teacher": str(files["lm"]), "data": {"source": str(files["corpus"]), "max_length": 16},
                  "validation_examples": 8, "test_examples": 8, "student": {"layers": [1]},
                  "stages": [{"epochs": 1, "learning_rate": 1e-2, "losses": [{"name": "forward_kl"}]}],
                  "eval": {"prompts": ["the film was"], "max_new_tokens": 4}, "train": train}
        script = "distill_lm.py"
    else:
        values = {"teacher": str(files["encoder"]),
                  "data": {"source": str(files["csv"]), "text_column": "review", "label_column": "sentiment",
                           "max_length": 16},
                  "student": {"layers": [1, 3]},
                  "stages": [{"epochs": 1, "learning_rate": 1e-3, "losses": [{"name": "kl"}, {"name": "ce"}]}],
                  "train": train}
        script = "distill_student.py"
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({**values, "output_dir": str(out)}))
    return script, ["--config", str(config)]


def launch(kind: str, files: dict[str, Path], out: Path, timeout: float) -> dict:
    script, args = launch_args(kind, files, out)
    start = time.perf_counter()
    try:
        done = launch_bounded(REPO / "recipes" / script, args, out.parent, None, timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as hang:
        code, output = "hang", f"{hang.output}{hang.stderr}"
    return {"kind": kind, "code": code, "seconds": time.perf_counter() - start, "output": output}


def loop(worker: int, repeats: int, files: dict[str, Path], out: Path, timeout: float, kinds: list[str]) -> list:
    results = []
    for round_ in range(repeats):
        for kind in kinds:
            result = launch(kind, files, out / f"w{worker}-{kind}-{round_}", timeout)
            if result["code"] != 0:
                failures = out / "failures"
                failures.mkdir(exist_ok=True)
                (failures / f"w{worker}-{kind}-{round_}.log").write_text(str(result["output"]))
            else:
                shutil.rmtree(out / f"w{worker}-{kind}-{round_}", ignore_errors=True)
            print(json.dumps({k: v for k, v in result.items() if k != "output"}), flush=True)
            results.append(result)
    return results


def table(results: list[dict]) -> str:
    rows = ["| launch | launches | failed | hung | median s |", "|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in results):
        mine = [r for r in results if r["kind"] == kind]
        failed = sum(r["code"] not in (0, "hang") for r in mine)
        hung = sum(r["code"] == "hang" for r in mine)
        rows.append(f"| {kind} | {len(mine)} | {failed} | {hung} | "
                    f"{statistics.median(r['seconds'] for r in mine):.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="launches of each kind per loop")
    parser.add_argument("--parallel", type=int, default=2, help="loops side by side (2 loads both cores)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a launch counts as hung")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "stress")
    args = parser.parse_args(argv)
    files = assets(args.out / "assets")
    with ThreadPoolExecutor(args.parallel) as pool:
        loops = [pool.submit(loop, w, args.repeats, files, args.out, args.timeout, args.kinds)
                 for w in range(args.parallel)]
        results = [r for future in loops for r in future.result()]
    print(table(results))
    return int(any(r["code"] != 0 for r in results))


if __name__ == "__main__":
    sys.exit(main())
