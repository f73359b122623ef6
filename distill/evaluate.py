"""Measurements shared by every stage: task accuracy, parameters, size on disk, CPU latency."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedModel


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Accuracy over the whole loader, gathered across processes (duplicates from padding removed)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def disk_size_mb(folder: str | Path) -> float:
    """Size of the weight files (safetensors) in a saved model folder, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


@torch.inference_mode()
def latency_ms(model: PreTrainedModel, batch: dict[str, torch.Tensor], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on `batch`."""
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def alternating_latencies(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], rounds: int,
                          warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median over `rounds` rounds of each model's `latency_ms`; the rounds alternate between the models so that
    drift in machine load hits every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(latency_ms(model, batch, warmup=warmup, repeats=repeats))
    return {name: statistics.median(values) for name, values in times.items()}


def latency_batch(tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 64) -> dict[str, torch.Tensor]:
    """A fixed batch padded to `max_length` so that every model is timed on identical work."""
    chosen = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    return dict(tokenizer(chosen, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))
