"""Per-architecture facts in one place: where a model keeps its layers, attention heads and feed-forward block,
and which modules quantization leaves alone.

Paths are relative: `layers` inside the base model (`model.base_model`), the others inside one layer. Everything
that copies, prunes or quantizes parts of a model asks this module instead of hard-coding module names."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from distill.core.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    layers: str
    query: str
    key: str
    value: str
    """Query, key and value Linears; one fused Linear (Phi-3's `qkv_proj`) names the same path three times, its rows
    stacked query, key, value."""
    attention_out: str
    ffn_in: tuple[str, ...]
    """Linears whose output rows are the FFN's intermediate neurons (BERT: one; Llama: gate and up; Phi-3: one fused
    `gate_up_proj` whose rows are the gate's, then the up projection's)."""
    ffn_out: str
    decoder: bool
    task_heads: tuple[str, ...]
    """Names of the modules above the layers that quantization keeps in full precision: the task heads, the
    pooler and the LM head (small, and the most sensitive to rounding)."""
    fused_ffn_in: bool = False
    """`ffn_in` is one Linear holding gate and up rows (Phi-3)."""

    def attention_inputs(self) -> tuple[str, ...]:
        """The distinct Linears that read the attention's input."""
        return tuple(dict.fromkeys((self.query, self.key, self.value)))

    @property
    def fused_qkv(self) -> bool:
        return self.query == self.key == self.value


ENCODER = Arch(
    layers="encoder.layer", query="attention.self.query", key="attention.self.key", value="attention.self.value",
    attention_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense", decoder=False,
    task_heads=("classifier", "pooler"),
)
DECODER = Arch(
    layers="layers", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
    attention_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", decoder=True,
    task_heads=("score", "lm_head"),
)
FUSED_DECODER = Arch(
    layers="layers", query="self_attn.qkv_proj", key="self_attn.qkv_proj", value="self_attn.qkv_proj",
    attention_out="self_attn.o_proj", ffn_in=("mlp.gate_up_proj",), ffn_out="mlp.down_proj", decoder=True,
    task_heads=("score", "lm_head"), fused_ffn_in=True,
)
ARCHS = {
    "bert": ENCODER, "roberta": ENCODER, "xlm-roberta": ENCODER, "electra": ENCODER,
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER, "gemma2": DECODER,
    "gemma3_text": DECODER, "phi3": FUSED_DECODER,
}


PER_LAYER_FIELDS = ("layer_types",)
"""Config fields with one entry per layer: each decoder layer's attention kind, sliding window or full (Gemma2/3,
Qwen2/3 and others)."""
LAYER_COUNT_FIELDS = ("max_window_layers",)
"""Config fields that count layers from the bottom: Qwen2/3's layers below it attend fully, those above through the
sliding window (the rule that makes `layer_types` when a config does not list them)."""
COMPRESSION_PATHS = ("linear_shapes", "low_rank")
"""Entries of a compressed checkpoint's `config.compression` keyed by module path, layers' modules among them
(per-layer head counts and FFN widths): see prune/saving.py."""


def config_for_layers(config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """A copy of `config` for a model whose layer i stands for layer `layers[i]` of `config`'s model: its layer count
    and every per-layer field follow those layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    for key in PER_LAYER_FIELDS:
        if getattr(config, key, None) is not None:
            setattr(config, key, [getattr(config, key)[i] for i in layers])
    for key in LAYER_COUNT_FIELDS:
        if getattr(config, key, None) is not None:
            setattr(config, key, sum(i < getattr(config, key) for i in layers))
    spec = getattr(config, "compression", None)
    if spec:
        config.compression = {**spec, **{key: renumbered_paths(spec[key], arch_of(config).layers, layers)
                                         for key in COMPRESSION_PATHS if key in spec}}
    return config


def renumbered_paths(values: dict, layers_path: str, layers: list[int]) -> dict:
    """`values` keyed by module path, with the paths inside layer `layers[i]` moved to layer i and those of other
    layers left out."""
    new_index = {old: new for new, old in enumerate(layers)}
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    moved = {}
    for path, value in values.items():
        match = pattern.match(path)
        if match is None:
            moved[path] = value
        elif int(match.group(1)) in new_index:
            moved[f"{layers_path}.{new_index[int(match.group(1))]}.{path[match.end():]}"] = value
    return moved


def arch_of(model_or_config: PreTrainedModel | PretrainedConfig, purpose: str = "this operation") -> Arch:
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type not in ARCHS:
        raise ConfigError(
            f"architecture '{config.model_type}' is not supported for {purpose}; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[config.model_type]


def layer_list(model: PreTrainedModel, purpose: str = "layer copying") -> nn.ModuleList:
    return model.base_model.get_submodule(arch_of(model, purpose).layers)


def layer_list_path(model: PreTrainedModel, purpose: str = "layer copying") -> str:
    """Dotted path of the layer list from `model` itself (e.g. `bert.encoder.layer`), for state-dict keys."""
    layers = layer_list(model, purpose)
    return next(name for name, module in model.named_modules() if module is layers)


def base_model_path(model: PreTrainedModel) -> str:
    """'' when `model` is the base model, else its attribute name (`bert`, `model`, ...)."""
    base = model.base_model
    return next(name for name, module in model.named_modules() if module is base)


def task_head_paths(model: PreTrainedModel, purpose: str = "quantization") -> list[str]:
    """Paths (from `model`) of the modules that `Arch.task_heads` names, outside the layer stack: for BERT
    `bert.pooler` and `classifier`, for a Llama causal LM `lm_head`."""
    arch, layers = arch_of(model, purpose), layer_list_path(model, purpose)
    return [name for name, _ in model.named_modules()
            if name.rpartition(".")[2] in arch.task_heads and not name.startswith(f"{layers}.")]


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_group_size(config: PretrainedConfig) -> int:
    """Query heads sharing one key/value head (1 without grouped-query attention)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads // kv_heads


def attention_row_slices(heads: int, kv_heads: int, d: int) -> tuple[slice, slice, slice]:
    """Rows of the query, key and value in a fused qkv Linear of `heads` query and `kv_heads` key/value heads."""
    q_end, k_end = heads * d, (heads + kv_heads) * d
    return slice(0, q_end), slice(q_end, k_end), slice(k_end, k_end + kv_heads * d)


def qkv_weights(layer: nn.Module, arch: Arch, d: int) -> tuple:
    """The query, key and value weights of a layer (views into a fused Linear's)."""
    if not arch.fused_qkv:
        return tuple(layer.get_submodule(path).weight for path in (arch.query, arch.key, arch.value))
    weight = layer.get_submodule(arch.query).weight
    heads = layer.get_submodule(arch.attention_out).in_features // d
    kv_heads = (weight.shape[0] - heads * d) // (2 * d)
    return tuple(weight[rows] for rows in attention_row_slices(heads, kv_heads, d))


def ffn_in_weights(layer: nn.Module, arch: Arch) -> tuple:
    """The weights whose rows are the FFN neurons: gate and up (halves of a fused Linear's)."""
    if not arch.fused_ffn_in:
        return tuple(layer.get_submodule(path).weight for path in arch.ffn_in)
    return tuple(layer.get_submodule(arch.ffn_in[0]).weight.chunk(2))
