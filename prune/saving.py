"""Save pruned or factorised models so that they reload with `from_pretrained`.

Shapes the stock config can express are written into it (layer count, a uniform FFN width, uniform head counts
of decoders, which have an explicit `head_dim`; the vocabulary size is kept there by vocabulary pruning). Anything
else (per-layer head counts of encoders, per-layer FFN widths, low-rank factors, int8 embeddings) goes into
`config.compression`, and the checkpoint ships `modeling_compressed.py`
(prune/remote_modeling.py) mapped through `config.auto_map`, so `from_pretrained(..., trust_remote_code=True)`
rebuilds the same shapes."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.arch import arch_of, head_dim, layer_list
from distill.core.io import save_model
from prune.lowrank import is_low_rank_pair
from prune.remote_modeling import Int8Embedding, LowRankEmbedding

REMOTE_FILE = "modeling_compressed.py"
COMPRESSION_KEYS = ("compression", "auto_map")


def layer_shapes(model: PreTrainedModel) -> list[dict[str, int]]:
    """Per layer: query heads, key/value heads and FFN width, read from the module shapes."""
    arch, d = arch_of(model, "pruning"), head_dim(model.config)
    shapes = []
    for layer in layer_list(model, "pruning"):
        heads = in_features_or_out(layer.get_submodule(arch.attention_out), out=False) // d
        key_rows = in_features_or_out(layer.get_submodule(arch.key), out=True)
        shapes.append({
            "heads": heads,
            "kv_heads": (key_rows - heads * d) // (2 * d) if arch.fused_qkv else key_rows // d,
            "intermediate": in_features_or_out(layer.get_submodule(arch.ffn_out), out=False),
        })
    return shapes


def in_features_or_out(module: nn.Module, out: bool) -> int:
    """Works for a Linear and for a low-rank pair (Sequential of two Linears)."""
    if isinstance(module, nn.Sequential):
        return module[-1].out_features if out else module[0].in_features
    return module.out_features if out else module.in_features


def sync_config(model: PreTrainedModel) -> None:
    """Write into the stock config every shape it can express."""
    config, arch = model.config, arch_of(model, "pruning")
    shapes = layer_shapes(model)
    config.num_hidden_layers = len(shapes)
    embedding = model.get_input_embeddings()
    if isinstance(embedding, nn.Embedding):  # hidden-size pruning (compressed embeddings keep their width)
        config.hidden_size = embedding.embedding_dim
    widths = {s["intermediate"] for s in shapes}
    if len(widths) == 1:
        config.intermediate_size = widths.pop()
    heads = {(s["heads"], s["kv_heads"]) for s in shapes}
    if arch.decoder and len(heads) == 1:
        config.head_dim = head_dim(config)
        config.num_attention_heads, config.num_key_value_heads = heads.pop()


def stock_class(model: PreTrainedModel) -> type:
    return next(cls for cls in type(model).__mro__ if cls.__module__.startswith("transformers."))


def compression_spec(model: PreTrainedModel) -> dict:
    """Where `model` differs from the stock model its config describes: resized and factorised Linears, and
    factorised and int8 embeddings."""
    with torch.device("meta"):
        reference = stock_class(model)(copy.deepcopy(model.config)).base_model
    shapes, ranks, embedding_ranks, int8 = {}, {}, {}, []
    for path, module in model.base_model.named_modules():
        if is_remote(module, Int8Embedding):
            int8.append(path)
        if is_remote(module, LowRankEmbedding):
            embedding_ranks[path] = module.rank
        if path.rpartition(".")[0] in ranks or any(path.startswith(f"{p}.") for p in embedding_ranks):
            continue  # a half of a low-rank pair or embedding, recorded with it
        if is_low_rank_pair(module):
            ranks[path] = module[0].out_features
            module = nn.Linear(module[0].in_features, module[1].out_features, device="meta")
        if isinstance(module, nn.Linear):
            ref = reference.get_submodule(path)
            if (ref.in_features, ref.out_features) != (module.in_features, module.out_features):
                shapes[path] = [module.in_features, module.out_features]
    found = (("linear_shapes", shapes), ("low_rank", ranks), ("low_rank_embeddings", embedding_ranks),
             ("int8_embeddings", int8))
    return {key: value for key, value in found if value}


def is_remote(module: nn.Module, cls: type) -> bool:
    """isinstance by class name, so that it also holds for the copy of `cls` that a reloaded checkpoint's
    `modeling_compressed.py` defines."""
    return type(module).__name__ == cls.__name__


def auto_class_names(model: PreTrainedModel) -> dict[str, str]:
    """auto_map entries: the saved class under its Auto name, and the base model under AutoModel."""
    cls, base = stock_class(model), stock_class(model.base_model)
    family = base.__name__.removesuffix("Model")
    names = {"AutoModel": base.__name__}
    if cls is not base:
        names["AutoModel" + cls.__name__.removeprefix(family)] = cls.__name__
    return names


def remote_code(class_names: list[str]) -> str:
    template = (Path(__file__).with_name("remote_modeling.py")).read_text()
    lines = [f"Compressed{name} = compressed(transformers.{name})" for name in class_names]
    return template + "\n\n" + "\n".join(lines) + "\n"


def save_compressed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                    extra_files: dict[str, str | bytes] | None = None) -> None:
    """save_pretrained (atomically) with `extra_files`, plus the remote code when the shapes need it."""
    sync_config(model)
    spec = compression_spec(model)
    for key in COMPRESSION_KEYS:
        if hasattr(model.config, key):
            delattr(model.config, key)
    extra_files = dict(extra_files or {})
    if spec:
        names = auto_class_names(model)
        model.config.compression = spec
        model.config.auto_map = {auto: f"{REMOTE_FILE[:-3]}.Compressed{name}" for auto, name in names.items()}
        extra_files[REMOTE_FILE] = remote_code(list(names.values()))
    save_model(model, tokenizer, Path(path), extra_files)
