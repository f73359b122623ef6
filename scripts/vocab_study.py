"""The small-model pipeline of the vocabulary issue, per distilled student: + vocabulary pruning, + int8 word
embedding, + bitsandbytes int8 Linears. Each step is a separate process of its recipe; finished steps are reused.
Prints test accuracy, parameters and disk size per step (mean over the students), against the teacher.

    python scripts/vocab_study.py runs/seeds/distill_tinybert-seed0/model runs/seeds/distill_tinybert-seed1/model \
        runs/seeds/distill_tinybert-seed2/model --out runs/vocab-study
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from distill.core.evaluate import disk_size_mb

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["student", "+ vocabulary pruning", "+ int8 word embedding", "+ bnb int8 Linears"]


def run(script: str, config: str, out: Path, overrides: list[str]) -> None:
    if (out / "metrics.json").is_file():
        return
    cmd = [sys.executable, str(ROOT / "recipes" / script), "--config", str(ROOT / "recipes" / config),
           f"output_dir={out}", *overrides]
    with out.with_suffix(".log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def pipeline(student: Path, out: Path) -> dict[str, dict]:
    """The four rows for one student: accuracy, parameters, disk MB."""
    vocab, vocab_int8, bnb = out / "vocab", out / "vocab-int8", out / "bnb-int8"
    run("prune_model.py", "prune_vocab.yaml", vocab, [f"model={student}", "embeddings.int8=false"])
    run("prune_model.py", "prune_vocab.yaml", vocab_int8, [f"model={student}"])
    run("quantize_model.py", "quantize_student.yaml", bnb, [f"model={vocab_int8 / 'model'}", "variants=[bnb_int8]"])
    read = lambda folder: json.loads((folder / "metrics.json").read_text())  # noqa: E731
    first = read(vocab)["unpruned"]
    quantized = read(bnb)["variants"]["bnb_int8"]
    rows = {"student": {"accuracy": first["test_accuracy"], "parameters": first["parameters"],
                        "disk_mb": disk_size_mb(student)}}
    for step, folder in (("+ vocabulary pruning", vocab), ("+ int8 word embedding", vocab_int8)):
        m = read(folder)
        rows[step] = {"accuracy": m["test_accuracy"], "parameters": m["parameters"], "disk_mb": m["disk_mb"],
                      "tokens_kept": m["vocab"]["tokens_kept"]}
    rows["+ bnb int8 Linears"] = {"accuracy": quantized["accuracy"], "parameters": rows["+ int8 word embedding"]
                                  ["parameters"], "disk_mb": quantized["disk_mb"]}
    return rows


def markdown(teacher: dict, per_student: list[dict[str, dict]]) -> str:
    lines = ["| model | test acc. (mean ± std) | kept of teacher | params | disk MB | of teacher's disk |",
             "|---|---|---|---|---|---|",
             f"| teacher | {100 * teacher['test_accuracy']:.2f} | 100.0% | {teacher['parameters'] / 1e6:.1f}M | "
             f"{teacher['disk_mb']:.1f} | 1/1 |"]
    for step in STEPS:
        accs = [rows[step]["accuracy"] for rows in per_student]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        disk = statistics.mean(rows[step]["disk_mb"] for rows in per_student)
        params = statistics.mean(rows[step]["parameters"] for rows in per_student)
        lines.append(f"| {step} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | "
                     f"{100 * statistics.mean(accs) / teacher['test_accuracy']:.1f}% | {params / 1e6:.2f}M | "
                     f"{disk:.2f} | 1/{teacher['disk_mb'] / disk:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", type=Path, help="distilled student model folders")
    parser.add_argument("--teacher-metrics", type=Path, default=Path("runs/teacher/metrics.json"))
    parser.add_argument("--out", type=Path, default=Path("runs/vocab-study"))
    args = parser.parse_args(argv)
    teacher = json.loads(args.teacher_metrics.read_text())
    per_student = []
    for i, student in enumerate(args.students):
        out = args.out / f"student{i}"
        out.mkdir(parents=True, exist_ok=True)
        per_student.append(pipeline(student, out))
    (args.out / "summary.json").write_text(json.dumps({"teacher": teacher, "students": per_student}, indent=2))
    print(markdown(teacher, per_student))


if __name__ == "__main__":
    main()
