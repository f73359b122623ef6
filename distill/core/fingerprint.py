"""SHA-256 fingerprints of what a result was computed from: a model's config and weights, a tokenizer's ids, and
a corpus of token ids. Two fingerprints are equal exactly when the things are, whatever path they were loaded from."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

# set by saving and loading (so differ between a model built in memory and its saved copy) or by the library
# version, without changing what the model computes; a change of dtype changes the weights' fingerprint instead
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures", "dtype")


def config_sha256(config: PretrainedConfig) -> str:
    values = {key: value for key, value in config.to_dict().items() if key not in VOLATILE_CONFIG_KEYS}
    return text_sha256(json.dumps(values, sort_keys=True, default=str))


def weights_sha256(model: nn.Module) -> str:
    """Over the state dict's tensors in name order (names included)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """Over what gives token ids their meaning: the vocabulary (added tokens included) and the special tokens. The
    pad token is left out: runs set it at will (eos as pad), and it never reaches a real token position."""
    special = {name: str(value) for name, value in tokenizer.special_tokens_map.items() if name != "pad_token"}
    return text_sha256(json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": special}, sort_keys=True))


def token_ids_sha256(examples: Iterable[Sequence[int]]) -> str:
    """Over the token ids of every example, in order (each preceded by its length, so boundaries count too)."""
    digest = hashlib.sha256()
    for ids in examples:
        row = np.asarray(ids, dtype=np.int64)
        digest.update(np.int64(len(row)).tobytes())
        digest.update(row.tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
