"""The compression report of a pipeline: every model its stages saved (each quantized variant on its own), measured
side by side on one split and one fixed latency batch, the first (the teacher) as the reference.

Per model: `runtime` (`torch`, or `onnxruntime` for an ONNX file of an `export_onnx` stage, run by
`quant.export.onnx.OnnxClassifier` with torch's thread count), `accuracy` (`distill.core.evaluate.accuracy`),
`parameters` (as full-precision numbers: see `stored_parameters`; an ONNX file's initializers), `disk_mb` (safetensors
files; the ONNX file), `weight_mb` (`quant.measure.classifier_metrics.weight_memory`: quantization state included; an
ONNX file's initializers), `latency_ms` (median CPU time of one forward pass, in rounds alternating between the models:
`distill.core.evaluate.alternating_latencies`) and `examples_per_s` at that batch. Written as `compression_report.json`,
a Markdown table (`.md`) and a plot of accuracy against disk size and against latency (`.png`) with the Pareto front of
each."""
from __future__ import annotations

import json
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.core.errors import require_package
from distill.core.evaluate import accuracy, alternating_latencies, disk_size_mb, examples_per_s
from quant.config import LatencyConfig
from quant.export.onnx import OnnxClassifier, is_onnx, onnx_sizes
from quant.measure.classifier_metrics import weight_memory
from quant.quantize import Evaluation
from quant.schemes.variants import load_variant

REPORT_NAME = "compression_report"
FIGURES = ["accuracy", "parameters", "disk_mb", "weight_mb", "latency_ms", "examples_per_s"]
"""The figures of every row, which a gate may name."""
PLOT_FILE = f"{REPORT_NAME}.png"
MATPLOTLIB_INSTALL = 'pip install -e ".[report]"'


@dataclass
class Candidate:
    """A saved model to measure, and the stage that saved it."""
    label: str
    stage: str
    kind: str
    path: Path
    """A model folder, or an ONNX file."""


def measure_models(candidates: list[Candidate], evaluation_of: Callable[[Path], Evaluation],
                   latency: LatencyConfig) -> list[dict]:
    """Accuracy, sizes and (alternated) latency of every candidate. `evaluation_of(folder)` gives the split and
    latency batch tokenized by the tokenizer in `folder`: a vocabulary-pruned student and its teacher each read the
    texts through their own tokenizer."""
    models, batches, rows = {}, {}, []
    for candidate in candidates:
        model = models[candidate.label] = load_candidate(candidate.path)
        evaluation = evaluation_of(tokenizer_folder(candidate.path))
        batches[candidate.label] = evaluation.batch
        rows.append({"model": candidate.label, "stage": candidate.stage, "kind": candidate.kind,
                     "runtime": "onnxruntime" if is_onnx(candidate.path) else "torch", "path": str(candidate.path),
                     "accuracy": accuracy(model, evaluation.loader, evaluation.accelerator),
                     **sizes(model, candidate.path)})
    latencies = alternating_latencies(models, batches, latency.rounds, latency.warmup, latency.repeats)
    for row in rows:
        row["latency_ms"] = latencies[row["model"]]
        row["examples_per_s"] = examples_per_s(latency.batch_size, row["latency_ms"])
    return rows


def tokenizer_folder(path: Path) -> Path:
    """The folder that holds a candidate's tokenizer: the model folder, or an ONNX file's folder."""
    return path.parent if is_onnx(path) else path


def load_candidate(path: Path) -> nn.Module:
    return OnnxClassifier(path) if is_onnx(path) else load_variant(path)


def sizes(model: nn.Module, path: Path) -> dict[str, float]:
    if is_onnx(path):
        return onnx_sizes(path)
    return {"parameters": stored_parameters(model), "disk_mb": disk_size_mb(path),
            "weight_mb": weight_memory(model, [])["weight_mb"]}


def stored_parameters(model: PreTrainedModel) -> int:
    """The weights the model holds, counted as numbers: bitsandbytes' 4-bit weights (two to a byte) at their
    original shape, and the weights of PyTorch's quantized Linears, which are not parameters."""
    total = 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        total += parameter.numel() if state is None else state.shape.numel()
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.Linear):
            bias = module.bias()
            total += module.weight().numel() + (0 if bias is None else bias.numel())
    return total


def markdown_table(rows: list[dict], split: str, batch_shape: tuple[int, int]) -> str:
    """One line per model; differences and ratios against the first row (the reference)."""
    base = rows[0]
    lines = [f"| model | stage kind | runtime | {split} accuracy | vs {base['model']} (points) | parameters | "
             f"disk MB | weight MB | CPU ms/batch ({batch_shape[0]}x{batch_shape[1]}) | examples/s | disk ratio | "
             "speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['kind']} | {row['runtime']} | {100 * row['accuracy']:.2f} | "
            f"{100 * (row['accuracy'] - base['accuracy']):+.2f} | {row['parameters'] / 1e6:.2f}M | "
            f"{row['disk_mb']:.2f} | {row['weight_mb']:.2f} | {row['latency_ms']:.1f} | {row['examples_per_s']:.0f} | "
            f"{row['disk_mb'] / base['disk_mb']:.2f}x | {base['latency_ms'] / row['latency_ms']:.2f}x |"
        )
    return "\n".join(lines)


def pareto_front(rows: list[dict], cost: Callable[[dict], float], quality: Callable[[dict], float]) -> list[dict]:
    """The rows no other row beats on both `quality` (higher is better) and `cost` (lower is better), by increasing
    cost."""
    front: list[dict] = []
    for row in sorted(rows, key=lambda r: (cost(r), -quality(r))):
        if not front or quality(row) > quality(front[-1]):
            front.append(row)
    return front


def require_matplotlib() -> ModuleType:
    return require_package("matplotlib", "the compression report's plot needs", MATPLOTLIB_INSTALL)


def plot(rows: list[dict], path: Path, split: str) -> None:
    """Accuracy against disk size and against latency, the reference (first row) as a star and a dotted line."""
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, cost, label in zip(axes, ("disk_mb", "latency_ms"), ("disk MB (weight files)", "CPU ms per batch")):
        front = pareto_front(rows, itemgetter(cost), itemgetter("accuracy"))
        axis.plot([r[cost] for r in front], [100 * r["accuracy"] for r in front], "--", color="grey",
                  label="Pareto front")
        axis.axhline(100 * rows[0]["accuracy"], linestyle=":", color="tab:red", label=f"{rows[0]['model']} (reference)")
        for i, row in enumerate(rows):
            point = (row[cost], 100 * row["accuracy"])
            axis.scatter(*point, marker="*" if i == 0 else "o", s=160 if i == 0 else 40,
                         color="tab:red" if i == 0 else "tab:blue", zorder=3)
            axis.annotate(row["model"], point, textcoords="offset points", xytext=(5, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel(f"{split} accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle("Accuracy against size and latency")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(rows: list[dict], folder: Path, header: dict) -> str:
    """`compression_report.json` (`header` + rows), `.md` and `.png` (`PLOT_FILE`) in `folder`; returns the
    Markdown table."""
    paths = {suffix: folder / f"{REPORT_NAME}.{suffix}" for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({**header, "reference": rows[0]["model"], "rows": rows}, indent=2))
    table = markdown_table(rows, header["split"], tuple(header["latency_batch"]))
    paths["md"].write_text(f"# Compression report\n\n{table}\n")
    plot(rows, paths["png"], header["split"])
    return table
