"""Measurements every job shares: task accuracy, the validation metric a trainer selects by, parameters, size on
disk, latency."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, TypeVar

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

Key = TypeVar("Key", bound=Hashable)


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


@dataclass(frozen=True)
class ValidationMetric:
    """What the trainer evaluates after each epoch (`validation_<name>`) and selects the best epoch by."""
    name: str
    compute: Callable[[torch.nn.Module, DataLoader, Accelerator], float]
    higher_is_better: bool = True

    def score(self, value: float) -> float:
        """`value` on a scale where higher is better."""
        return value if self.higher_is_better else -value


ACCURACY = ValidationMetric("accuracy", accuracy)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def disk_size_mb(folder: str | Path) -> float:
    """Size of the weight files (safetensors) in a saved model folder, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


@torch.inference_mode()
def latency_ms(model: PreTrainedModel, batch: dict[str, torch.Tensor], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of one forward pass on `batch` (on a GPU, until its kernels have finished)."""
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        synchronize(batch)
        start = time.perf_counter()
        model(**batch)
        synchronize(batch)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def synchronize(batch: dict[str, torch.Tensor]) -> None:
    """Wait for the GPU kernels queued on the batch's device; nothing on the CPU, which runs synchronously."""
    device = next(iter(batch.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def examples_per_s(batch_size: int, latency_ms: float) -> float:
    """Throughput of a model that takes `latency_ms` per batch of `batch_size` examples."""
    return 1000 * batch_size / latency_ms


def alternating_latencies(models: dict[Key, torch.nn.Module], batches: dict[Key, dict[str, torch.Tensor]],
                          rounds: int, warmup: int = 3, repeats: int = 10) -> dict[Key, float]:
    """Median over `rounds` rounds of each model's `latency_ms` on its batch in `batches` (the same texts for all;
    models with other vocabularies tokenize them their own way); the rounds alternate between the models so that
    drift in machine load hits every model alike."""
    times: dict[Key, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(latency_ms(model, batches[name], warmup=warmup, repeats=repeats))
    return {name: statistics.median(values) for name, values in times.items()}


def latency_batch(tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 64) -> dict[str, torch.Tensor]:
    """A fixed batch padded to `max_length` so that every model is timed on identical work."""
    chosen = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    return dict(tokenizer(chosen, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))
