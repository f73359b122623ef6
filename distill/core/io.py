"""Files written whole or not at all: a model folder, a JSON file, a safetensors file each appear (by rename) only
when complete, so a killed job never leaves a half-written output that a later run would trust."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
               extra_files: Optional[dict[str, str | bytes]] = None) -> None:
    """save_pretrained into a sibling temp folder, then rename: the folder appears only when complete.
    `extra_files` (name -> text or bytes) are written into it first."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, data in (extra_files or {}).items():
        if isinstance(data, bytes):
            (tmp / name).write_bytes(data)
        else:
            (tmp / name).write_text(data)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_json_atomic(values: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(values, indent=2))


def jsonl_text(rows) -> str:
    """Rows (dicts) as JSON Lines: one JSON object per line."""
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors that share memory (tied embeddings) are written as copies: safetensors refuses shared ones."""
    tmp = path.with_suffix(".tmp")
    written, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        written[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    save_file(written, str(tmp))
    tmp.replace(path)
