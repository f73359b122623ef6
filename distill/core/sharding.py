"""Fully sharded training (`train.sharding: fsdp2`): the student, its gradients and its optimizer state split over
the processes with PyTorch's FSDP2 (`fully_shard`), one unit per transformer layer; the teacher either a full frozen
copy per process or sharded the same way without gradients (`train.teacher_placement`).

Why not Accelerate's FSDP plugin: it wraps the one model that `prepare` sees, and distillation has two, with the
fused causal losses reading both LM heads after the forward passes. It is also switched off without GPUs (Accelerate
1.16 enables FSDP only on accelerators), so it could not be tested here; `fully_shard` runs on CPU (gloo) and GPU
(NCCL) alike. Accelerate still launches the processes, places the data and steps the schedule.

Layout: each repeated layer (the classes a model lists in `_no_split_modules`, found in a `ModuleList`) is a unit
that gathers its weights for its forward and backward only. The rest of a model (embeddings, final norm, LM head,
tied or not) is its root unit, kept gathered from its forward until its backward ends, so that a loss may read the
LM head's weight after the forward, as the fused causal losses do. Checkpoints are sharded
(torch.distributed.checkpoint, each process writes its part); the best epoch's and the final weights are gathered
into a full state dict."""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

SHARDINGS = ("none", "fsdp2")
TEACHER_PLACEMENTS = ("replicate", "shard")
FULL = StateDictOptions(full_state_dict=True)


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of `model`: members of a `ModuleList` whose class the model names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [layer for module in model.modules() if isinstance(module, nn.ModuleList)
            for layer in module if type(layer).__name__ in names]


def shard_model(model: nn.Module, root: nn.Module | None = None) -> None:
    """Shard `model` in place: one unit per repeated layer, the rest its own unit, gathered from forward to backward.
    With `root`, a module holding `model` (the objective) becomes the outermost unit, for what else it trains."""
    if not isinstance(model, FSDPModule):
        units = layer_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} lists no repeated layer class in _no_split_modules to shard by")
        for layer in units:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=False)
    if root is not None:
        fully_shard(root, reshard_after_forward=False)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (its shard of a sharded one)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this process holds of `module`'s trained weights, their gradients and the optimizer state, in bytes."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer_state = [value for state in optimizer.state.values() for value in state.values()
                       if isinstance(value, torch.Tensor) and value.dim() > 0]
    return {"weights": local_bytes(params), "gradients": local_bytes(params), "optimizer": local_bytes(optimizer_state)}


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of `module` on CPU (a collective: every process calls it)."""
    return {name: tensor.cpu() for name, tensor in get_model_state_dict(module, options=FULL).items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=FULL)


def gathered_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain (unsharded) copy of a sharded `model`, on CPU, in every process: what evaluation, generation and saving
    use after training."""
    state = full_state_dict(model)
    plain_class = next(cls for cls in type(model).__mro__
                       if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule))
    copy = plain_class(model.config)
    copy.load_state_dict(state)
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = model.generation_config
    copy.name_or_path = model.name_or_path
    return copy.train(model.training)


def save_sharded(folder: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each process writes its shards of `module` and of the optimizer state into `folder`."""
    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
