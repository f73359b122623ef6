"""Importance criteria, found by name, scoring every attention head, FFN neuron and layer of a model.

- magnitude: L2 norm of the weights a unit owns (a head's query/key/value rows and output columns, a neuron's
  input rows and output column, all of a layer's weights).
- taylor: first-order Taylor / head-mask gradient (Michel et al. 2019): |dL/dg| of a gate g=1 on each unit,
  accumulated over calibration batches.
- fisher: diagonal Fisher of the same gates (sum of (dL/dg)^2), the OBD-style second-order saliency of the
  mask (as in Kwon et al. 2022).
- activation, activation_squared: Minitron's activation-based importance on calibration text: the mean over real
  tokens of |a| (or a^2) where a is, for a head, the L2 norm of its attention output (the input of the output
  projection); for an FFN neuron, its activation (the input of the FFN's output Linear); for a hidden channel, the
  channel of every normalised residual stream inside the layers (each norm's output, summed). A layer's score is its
  block influence (ShortGPT): the mean over tokens of 1 - cos(its input, its output).
- random: a seeded baseline.
Higher means more important; `Scores.hidden` is None for criteria that do not score hidden channels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.core.arch import arch_of, ffn_in_weights, head_dim, kv_group_size, layer_list, qkv_weights
from distill.core.errors import ConfigError
from distill.core.registry import Registry
from prune.saving import layer_shapes


@dataclass
class Scores:
    heads: list[torch.Tensor]
    """Per layer, one score per query head."""
    neurons: list[torch.Tensor]
    """Per layer, one score per FFN intermediate neuron."""
    layers: torch.Tensor
    hidden: Optional[torch.Tensor] = None
    """One score per hidden (residual-stream) channel, where the criterion gives them."""


Batches = Iterable[dict[str, torch.Tensor]]
Criterion = Callable[[PreTrainedModel, Batches, int], Scores]
CRITERIA: Registry[Criterion] = Registry("importance criterion")
criterion = CRITERIA.register


def require_criterion(name: str) -> Criterion:
    return CRITERIA.require(name, "importance.criterion: ")


def score(model: PreTrainedModel, name: str, batches: Batches = (), seed: int = 0) -> Scores:
    return require_criterion(name)(model, batches, seed)


@criterion("magnitude")
@torch.no_grad()
def magnitude(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    arch, d, group = arch_of(model, "importance scoring"), head_dim(model.config), kv_group_size(model.config)
    heads, neurons, layer_norms = [], [], []
    for layer in layer_list(model, "importance scoring"):
        weight(layer, arch.query)  # refuses factorised Linears
        q, k, v = (w.float() for w in qkv_weights(layer, arch, d))
        o = weight(layer, arch.attention_out)
        per_head = lambda w: w.pow(2).view(-1, d, w.shape[1]).sum((1, 2))  # noqa: E731
        kv = (per_head(k) + per_head(v)).repeat_interleave(group) / group  # a shared group's weight split evenly
        owned = per_head(q) + kv + o.pow(2).t().reshape(-1, d, o.shape[0]).sum((1, 2))
        heads.append(owned.sqrt())
        rows = sum(w.float().pow(2).sum(1) for w in ffn_in_weights(layer, arch))
        neurons.append((rows + weight(layer, arch.ffn_out).pow(2).sum(0)).sqrt())
        layer_norms.append(sum(p.pow(2).sum() for p in layer.parameters()).sqrt())
    channels = model.get_input_embeddings().weight.float().norm(dim=0)
    return Scores(heads, neurons, torch.stack(layer_norms), channels)


def weight(layer: nn.Module, path: str) -> torch.Tensor:
    module = layer.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"{path} is a {type(module).__name__}, not a Linear: prune structure before factorizing")
    return module.weight.float()


@criterion("random")
def random_scores(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(model)
    return Scores([torch.rand(s["heads"], generator=generator) for s in shapes],
                  [torch.rand(s["intermediate"], generator=generator) for s in shapes],
                  torch.rand(len(shapes), generator=generator),
                  torch.rand(model.get_input_embeddings().weight.shape[1], generator=generator))


@criterion("activation")
def activation(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    return activation_scores(model, batches, torch.abs)


@criterion("activation_squared")
def activation_squared(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    return activation_scores(model, batches, torch.square)


@torch.no_grad()
def activation_scores(model: PreTrainedModel, batches: Batches, reduce: Callable) -> Scores:
    """The activation criteria (module docstring): hooks sum each quantity over the real tokens of every batch."""
    arch, d = arch_of(model, "importance scoring"), head_dim(model.config)
    layers = layer_list(model, "importance scoring")
    width = model.get_input_embeddings().weight.shape[1]
    shapes = layer_shapes(model)
    heads = [torch.zeros(s["heads"]) for s in shapes]
    neurons = [torch.zeros(s["intermediate"]) for s in shapes]
    influence, channels = torch.zeros(len(layers)), torch.zeros(width)
    mask: list[torch.Tensor] = []  # the current batch's attention mask, (batch, length, 1)

    def token_sum(values: torch.Tensor) -> torch.Tensor:
        """(batch, length, units) -> (units,): summed over real tokens."""
        return (values.float() * mask[0]).sum((0, 1)).cpu()

    def add_to(total: torch.Tensor, per_token: Callable):
        def hook(module, args):
            total.add_(token_sum(reduce(per_token(args[0]))))
        return hook

    def add_channels(module, args, output):
        channels.add_(token_sum(reduce(output)))

    def add_influence(i: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            influence[i] += token_sum((1 - cosine).unsqueeze(-1)).squeeze(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(arch.attention_out).register_forward_pre_hook(
            add_to(heads[i], lambda x: x.unflatten(-1, (-1, d)).norm(dim=-1))))
        handles.append(layer.get_submodule(arch.ffn_out).register_forward_pre_hook(add_to(neurons[i], lambda x: x)))
        handles.append(layer.register_forward_hook(add_influence(i), with_kwargs=True))
        handles.extend(norm.register_forward_hook(add_channels) for norm in stream_norms(layer, width))
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in tqdm(batches, desc="importance", leave=False):
            mask[:] = [batch["attention_mask"].unsqueeze(-1)]
            tokens += int(batch["attention_mask"].sum())
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not tokens:
        raise ConfigError("activation criteria need calibration batches; got none")
    return Scores([h / tokens for h in heads], [n / tokens for n in neurons], influence / tokens, channels / tokens)


def stream_norms(layer: nn.Module, width: int) -> list[nn.Module]:
    """The norms of a layer that normalise the residual stream: a weight of one value per hidden channel (not the
    per-head query/key norms of Qwen3 and Gemma3, whose weight has one value per head dimension)."""
    return [module for name, module in layer.named_modules() if "norm" in type(module).__name__.lower()
            and getattr(module, "weight", None) is not None and tuple(module.weight.shape) == (width,)
            and not name.rpartition(".")[2].startswith(("q_norm", "k_norm"))]


@criterion("taylor")
def taylor(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    return gate_gradients(model, batches, torch.abs)


@criterion("fisher")
def fisher(model: PreTrainedModel, batches: Batches, seed: int) -> Scores:
    return gate_gradients(model, batches, torch.square)


def gate_gradients(model: PreTrainedModel, batches: Batches, reduce: Callable) -> Scores:
    """Sum over batches of reduce(dL/dg) for gates g=1 on every head, neuron and layer (dropout off, weights
    frozen so that only the gates get gradients)."""
    gates = Gates(model)
    totals = Scores([torch.zeros_like(g) for g in gates.heads], [torch.zeros_like(g) for g in gates.neurons],
                    torch.zeros_like(gates.layers))
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    seen = 0
    try:
        for batch in tqdm(batches, desc="importance", leave=False):
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [*gates.heads, *gates.neurons, gates.layers])
            n = len(gates.heads)
            for total, grad in zip(totals.heads + totals.neurons, grads[: 2 * n]):
                total += reduce(grad)
            totals.layers += reduce(grads[-1])
            seen += 1
    finally:
        gates.remove()
        model.train(was_training)
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    if seen == 0:
        raise ConfigError("gradient criteria need calibration batches; got none")
    return totals


class Gates:
    """Multiplicative gates (all ones) on each head's output, each FFN neuron and each layer's residual update,
    attached with hooks: dL/dg is the first-order effect of removing that unit."""

    def __init__(self, model: PreTrainedModel):
        arch, d = arch_of(model, "importance scoring"), head_dim(model.config)
        shapes = layer_shapes(model)
        self.heads = [torch.ones(s["heads"], requires_grad=True) for s in shapes]
        self.neurons = [torch.ones(s["intermediate"], requires_grad=True) for s in shapes]
        self.layers = torch.ones(len(shapes), requires_grad=True)
        self.handles = []
        for i, layer in enumerate(layer_list(model, "importance scoring")):
            self.handles.append(layer.get_submodule(arch.attention_out).register_forward_pre_hook(
                head_gate(self.heads[i], d)))
            self.handles.append(layer.get_submodule(arch.ffn_out).register_forward_pre_hook(
                neuron_gate(self.neurons[i])))
            self.handles.extend(layer_gate(layer, self.layers, i))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def head_gate(gate: torch.Tensor, d: int):
    def hook(module, args):
        x = args[0]
        return ((x.unflatten(-1, (-1, d)) * gate.to(x.dtype)[:, None]).flatten(-2), *args[1:])
    return hook


def neuron_gate(gate: torch.Tensor):
    def hook(module, args):
        return (args[0] * gate.to(args[0].dtype), *args[1:])
    return hook


def layer_gate(layer: nn.Module, gates: torch.Tensor, i: int):
    """output = input + g * (output - input): g scales the layer's whole update of the residual stream."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        first = output[0] if isinstance(output, tuple) else output
        gated = x + gates[i].to(first.dtype) * (first - x)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    return [layer.register_forward_hook(hook, with_kwargs=True)]
