"""Side-by-side comparison of saved classifiers: test accuracy (from each run's metrics.json), parameters, size on
disk and CPU latency at fixed batches. A model is a saved model folder, an ONNX file, or an ONNX export folder
(`recipes/export_onnx.py`'s `model/`: each of its ONNX files), run in ONNX Runtime with torch's thread count.
Latencies are measured in alternation so that every model sees the same machine load; the ratios against the first
model are the numbers to quote.

    python scripts/bench_models.py runs/teacher/model runs/student/model [--batch-size 1 32 --max-length 64]
    python scripts/bench_models.py runs/student/model runs/student-onnx/model --batch-size 1 32 --threads 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from distill.core.evaluate import alternating_latencies, count_parameters, disk_size_mb, latency_batch
from distill.core.models import load_classifier
from quant.export.onnx import FILES, OnnxClassifier, is_onnx, onnx_sizes

SAMPLE_TEXTS = [
    "a gripping , beautifully acted drama that stays with you long after the credits roll .",
    "the plot is thin and the jokes fall flat .",
    "an uneven but often charming comedy .",
]


def expand(paths: list[Path]) -> list[Path]:
    """Each path as given; an ONNX export folder as its ONNX files."""
    return [file for path in paths
            for file in ([path / name for name in FILES.values() if (path / name).is_file()] or [path])]


def folder_of(path: Path) -> Path:
    """The folder with the model's config.json and tokenizer."""
    return path.parent if is_onnx(path) else path


def load(path: Path) -> nn.Module:
    return OnnxClassifier(path) if is_onnx(path) else load_classifier(str(path)).eval()


def read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_test_accuracy(path: Path) -> float | None:
    """The test accuracy that the run which saved `path` recorded (an ONNX export's, per file)."""
    if not is_onnx(path):
        return read_metrics(path.parent).get("test_accuracy")
    metrics = read_metrics(path.parent.parent)
    variant = next((name for name, file in FILES.items() if file == path.name), None)
    return metrics.get("onnx", {}).get(variant, {}).get("accuracy") if metrics.get("split") == "test" else None


def sizes(path: Path, model: nn.Module) -> tuple[int, float]:
    """Parameters and MB on disk: the safetensors files of a folder, an ONNX file's initializers and size."""
    if is_onnx(path):
        found = onnx_sizes(path)
        return found["parameters"], found["disk_mb"]
    return count_parameters(model), disk_size_mb(path)


def measure(paths: list[Path], batch_sizes: list[int], max_length: int, rounds: int, threads: int | None
            ) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    models = {str(path): load(path) for path in paths}
    # the same texts through each model's own tokenizer (a vocabulary-pruned student numbers its tokens anew), all
    # padded to max_length: identical work
    tokenizers = {str(path): AutoTokenizer.from_pretrained(folder_of(path)) for path in paths}
    latencies = {}
    for size in batch_sizes:
        batches = {name: latency_batch(tokenizer, SAMPLE_TEXTS, size, max_length)
                   for name, tokenizer in tokenizers.items()}
        latencies[size] = alternating_latencies(models, batches, rounds, warmup=1, repeats=5)
    rows = []
    for path in paths:
        parameters, disk_mb = sizes(path, models[str(path)])
        config = json.loads((folder_of(path) / "config.json").read_text())
        rows.append({"model": str(path), "runtime": "onnxruntime" if is_onnx(path) else "torch",
                     "test_accuracy": recorded_test_accuracy(path), "parameters": parameters, "disk_mb": disk_mb,
                     "latency_ms": {size: latencies[size][str(path)] for size in batch_sizes},
                     "layers": config.get("num_hidden_layers")})
    return rows


def markdown(rows: list[dict], batch_sizes: list[int], max_length: int) -> str:
    base = rows[0]
    timed = "".join(f" CPU ms/batch ({size}x{max_length}) | speed-up |" for size in batch_sizes)
    lines = [f"| model | runtime | test acc. | params | disk MB | acc. kept | size ratio |{timed}",
             "|---" * (7 + 2 * len(batch_sizes)) + "|"]
    for row in rows:
        acc = row["test_accuracy"]
        kept = f"{100 * acc / base['test_accuracy']:.1f}%" if acc and base["test_accuracy"] else "-"
        times = "".join(f" {row['latency_ms'][size]:.1f} | {base['latency_ms'][size] / row['latency_ms'][size]:.2f}x |"
                        for size in batch_sizes)
        lines.append(f"| {row['model']} | {row['runtime']} | {'-' if acc is None else f'{100 * acc:.2f}'} | "
                     f"{row['parameters'] / 1e6:.1f}M | {row['disk_mb']:.1f} | {kept} | "
                     f"{row['disk_mb'] / base['disk_mb']:.2f}x |{times}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path,
                        help="saved model folders, ONNX files or ONNX export folders; the first is the reference")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batch sizes (1 32)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and ONNX Runtime (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    paths = expand(args.models)
    missing = [str(path) for path in paths if not (folder_of(path) / "config.json").is_file()]
    if missing:
        parser.error(f"not a saved model folder, ONNX export folder or ONNX file beside its config.json: "
                     f"{', '.join(missing)}")
    rows = measure(paths, args.batch_size, args.max_length, args.rounds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows, args.batch_size, args.max_length))


if __name__ == "__main__":
    main()
