"""Side-by-side comparison of saved classifiers: test accuracy (from each run's metrics.json), parameters, size on
disk and CPU latency at a fixed batch. Latencies are measured in alternation so that both models see the same
machine load; the ratios against the first model are the numbers to quote.

    python scripts/bench_models.py runs/teacher/model runs/student/model [--batch-size 32 --max-length 64]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from distill.core.evaluate import alternating_latencies, count_parameters, disk_size_mb, latency_batch
from distill.core.sources import load_classifier

SAMPLE_TEXTS = [
    "a gripping , beautifully acted drama that stays with you long after the credits roll .",
    "the plot is thin and the jokes fall flat .",
    "an uneven but often charming comedy .",
]


def measure(folders: list[Path], batch_size: int, max_length: int, rounds: int, threads: int | None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    models = [load_classifier(str(f)).eval() for f in folders]
    batch = latency_batch(AutoTokenizer.from_pretrained(folders[0]), SAMPLE_TEXTS, batch_size, max_length)
    latencies = alternating_latencies(dict(zip(map(str, folders), models)), batch, rounds, warmup=1, repeats=5)
    rows = []
    for folder, model in zip(folders, models):
        metrics_file = folder.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({
            "model": str(folder), "test_accuracy": metrics.get("test_accuracy"),
            "parameters": count_parameters(model), "disk_mb": disk_size_mb(folder),
            "latency_ms": latencies[str(folder)], "layers": model.config.num_hidden_layers,
        })
    return rows


def markdown(rows: list[dict], batch_size: int, max_length: int) -> str:
    base = rows[0]
    lines = [f"| model | test acc. | params | disk MB | CPU ms/batch ({batch_size}x{max_length}) | "
             "acc. kept | size ratio | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        acc = row["test_accuracy"]
        kept = f"{100 * acc / base['test_accuracy']:.1f}%" if acc and base["test_accuracy"] else "-"
        lines.append(
            f"| {row['model']} | {'-' if acc is None else f'{100 * acc:.2f}'} | {row['parameters'] / 1e6:.1f}M | "
            f"{row['disk_mb']:.1f} | {row['latency_ms']:.0f} | {kept} | "
            f"{row['disk_mb'] / base['disk_mb']:.2f}x | {base['latency_ms'] / row['latency_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="saved model folders; the first is the reference")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    missing = [str(m) for m in args.models if not (m / "config.json").is_file()]
    if missing:
        parser.error(f"not a saved model folder: {', '.join(missing)}")
    rows = measure(args.models, args.batch_size, args.max_length, args.rounds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows, args.batch_size, args.max_length))


if __name__ == "__main__":
    main()
