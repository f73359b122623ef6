"""Numbers for comparing the variants of one model, and the Markdown table that shows them.

Per variant:
- `accuracy` on an evaluation loader (`distill.core.evaluate.accuracy`);
- `weight_mb`: every tensor the model holds, each counted once: parameters, buffers, and the quantization state
  that bitsandbytes and PyTorch keep outside them (row and block scales, code tables, the int8 weights of
  PyTorch's quantized Linears as `weight()` unpacks them; fbgemm's packed copy may add alignment padding);
- `linear_mb`, `linear_fp32_mb`, `linear_ratio`: the weights of the Linears that the variant targets (every Linear
  that `skip` does not match) with their quantization constants, biases excluded, against 4 bytes per weight;
- `forward_peak_mb`: the peak of the tensor memory that torch allocates during one forward pass of the latency batch
  (activations and temporaries, on top of the weights), from the profiler's allocation events. Memory that kernels
  take outside torch's allocator (oneDNN or fbgemm scratch space) is not seen, and neither is the process' RSS;
- `disk_mb`: the safetensors files of the saved folder (`distill.core.evaluate.disk_size_mb`);
- `latency_ms`: the median wall-clock time of one forward pass of the fixed batch (`distill.core.evaluate.latency_ms`),
  in rounds that alternate between the variants so that every variant sees the same machine load."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from distill.core.evaluate import accuracy, disk_size_mb
from quant.schemes.loading import target_linears

MB = 1e6


def measure_variant(model: PreTrainedModel, folder: str | Path, loader: DataLoader, accelerator: Accelerator,
                    batch: dict[str, torch.Tensor], skip: list[str]) -> dict:
    """Everything but latency (see `distill.core.evaluate.alternating_latencies`) for one variant saved in `folder`."""
    return {
        "accuracy": accuracy(model, loader, accelerator),
        **weight_memory(model, skip),
        "forward_peak_mb": forward_peak_bytes(model, batch) / MB,
        "disk_mb": disk_size_mb(folder),
    }


def weight_memory(model: nn.Module, skip: list[str]) -> dict[str, float]:
    seen: dict[int, torch.Tensor] = {}
    total = sum(unseen_bytes(module_tensors(module), seen) for module in model.modules())
    targets = target_linears(model, skip)
    seen = {}
    linear = sum(unseen_bytes(weight_tensors(module), seen) for module in targets.values())
    fp32 = sum(4 * module.in_features * module.out_features for module in targets.values())
    return {"weight_mb": total / MB, "linear_mb": linear / MB, "linear_fp32_mb": fp32 / MB,
            "linear_ratio": linear / fp32 if fp32 else None}


def unseen_bytes(tensors: list[torch.Tensor], seen: dict[int, torch.Tensor]) -> int:
    """Bytes of the tensors whose memory is not in `seen` yet (tied and shared tensors count once). `seen` keeps
    each tensor alive: the unpacked weights of quantized Linears are temporaries whose memory could be reused."""
    total = 0
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen[tensor.data_ptr()] = tensor
            total += tensor.numel() * tensor.element_size()
    return total


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors `module` itself holds (not its children's), quantization state included."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if isinstance(module, torch.ao.nn.quantized.Linear):
        bias = module.bias()
        return weight_tensors(module) + ([] if bias is None else [bias])
    if isinstance(module, nn.Linear):
        tensors += weight_tensors(module)[1:]
    return tensors


def weight_tensors(linear: nn.Module) -> list[torch.Tensor]:
    """A Linear's weight and the constants needed to dequantize it: PyTorch's per-row scales and zero points,
    bitsandbytes' int8 row scales (`SCB`) or its 4-bit quantization state (block scales and code tables)."""
    if isinstance(linear, torch.ao.nn.quantized.Linear):
        weight = linear.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return [weight, weight.q_per_channel_scales(), weight.q_per_channel_zero_points()]
        return [weight]
    weight = linear.weight
    tensors = [weight]
    # int8 row scales: on the weight until the first forward pass, then on the layer's matmul state
    tensors += [scb for scb in (getattr(weight, "SCB", None), getattr(getattr(linear, "state", None), "SCB", None))
                if scb is not None]
    state = getattr(weight, "quant_state", None)
    while state is not None:
        tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
        state = state.state2
    return tensors


@torch.inference_mode()
def forward_peak_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Peak of the bytes torch allocated and had not freed yet during one forward pass of `batch`."""
    model.eval()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def markdown_table(rows: list[dict], batch_shape: tuple[int, int]) -> str:
    """One line per variant; differences and ratios against the first row (the reference, normally fp32)."""
    base = rows[0]
    lines = [f"| variant | accuracy | vs {base['variant']} (points) | weight MB | quantized Linears MB | of fp32 | "
             f"forward peak MB | disk MB | CPU ms/batch ({batch_shape[0]}x{batch_shape[1]}) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "-" if row["linear_ratio"] is None else f"{100 * row['linear_ratio']:.1f}%"
        lines.append(
            f"| {row['variant']} | {100 * row['accuracy']:.2f} | {100 * (row['accuracy'] - base['accuracy']):+.2f} | "
            f"{row['weight_mb']:.2f} | {row['linear_mb']:.2f} | {ratio} | {row['forward_peak_mb']:.1f} | "
            f"{row['disk_mb']:.2f} | {row['latency_ms']:.1f} | {base['latency_ms'] / row['latency_ms']:.2f}x |"
        )
    return "\n".join(lines)
