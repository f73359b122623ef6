"""What the trainer gets from a classifier teacher besides its live forward: the teacher in reduced precision
(`train.teacher_dtype`), and its logits cached before training (`train.cache_teacher_logits`).

With the cache, every loss reads only the teacher's logits: the teacher runs once over the training split (in
inference mode, batched) and never during training. Each training example carries its row index as `cache_index`,
through any shuffling, epoch or resume, and the collator adds the teacher's logits for the batch's examples under
`TEACHER_LOGITS`. They are computed on batches padded differently from the training batches: they equal the live
teacher's up to floating-point rounding (padding is masked out)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distill.core.collate import CACHE_INDEX, IndexedRowsCollator
from distill.core.conversion_cache import cache_root
from distill.core.errors import ConfigError
from distill.core.fingerprint import text_sha256, token_ids_sha256, weights_sha256
from distill.core.loss_interface import LOSSES, TEACHER_LOGITS, model_inputs
from distill.core.run import Task
from distill.encoder.config import DistillConfig
from distill.encoder.multi_teacher import TeacherEnsemble


def check_logit_cache(cfg: DistillConfig) -> None:
    """Config-only checks of `train.cache_teacher_logits`: only the teacher's logits are kept."""
    if not cfg.train.cache_teacher_logits:
        return
    reads_teacher = False
    for i, stage in enumerate(cfg.stages):
        for loss in stage.losses:
            cls = LOSSES[loss.name]
            if cls.needs_teacher and (cls.needs_hidden_states or cls.needs_attentions):
                raise ConfigError(
                    f"train.cache_teacher_logits keeps only the teacher's logits, but loss '{loss.name}' "
                    f"(stages[{i}]) reads its {'attention maps' if cls.needs_attentions else 'hidden states'}: "
                    "drop the loss or set train.cache_teacher_logits=false")
            reads_teacher = reads_teacher or cls.needs_teacher
    if not reads_teacher:
        raise ConfigError("train.cache_teacher_logits is set, but no loss reads the teacher")
    if cfg.extra_teachers:
        raise ConfigError("train.cache_teacher_logits keeps one teacher's logits; it does not work with "
                          "extra_teachers")


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, dataset: Dataset, collate: Callable, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """The teacher's float32 logits for every example of `dataset`, in its order, on the CPU. Batches are formed
    from examples of similar length (less padding, which is masked out anyway)."""
    teacher.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    # A private generator: a loader iterator would otherwise draw from the global RNG, and the student's dropout
    # masks would differ from those of a run with the live teacher.
    loader = DataLoader(dataset.select(order), batch_size, collate_fn=collate, generator=torch.Generator())
    sorted_logits = torch.cat([teacher(**model_inputs(batch.to(device))).logits.float().cpu()
                               for batch in tqdm(loader, desc="teacher logits", leave=False)])
    logits = torch.empty_like(sorted_logits)
    logits[torch.tensor(order)] = sorted_logits
    return logits


def stored_teacher_logits(teacher: nn.Module, dataset: Dataset, collate: Callable, batch_size: int,
                          device: torch.device) -> torch.Tensor:
    """`teacher_logits`, kept on disk under the cache folder (`$DISTILL_COMPRESS_CACHE/teacher-logits`) by a key of
    the teacher's weights and dtype and the examples' token ids, so that runs over the same data (other seeds,
    other students) reuse them."""
    ids = [list(row) for row in dataset["input_ids"]]
    key = text_sha256(weights_sha256(teacher) + str(next(teacher.parameters()).dtype) + token_ids_sha256(ids))
    path = cache_root() / "teacher-logits" / f"{key}.safetensors"
    if path.is_file():
        logits = load_file(path)["logits"]
        if logits.shape[0] == len(dataset):
            return logits
    logits = teacher_logits(teacher, dataset, collate, batch_size, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named by the process: the processes of a data-parallel launch each compute and write the same file
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"logits": logits}, str(tmp))
    os.replace(tmp, path)
    return logits


def with_cached_logits(teacher: nn.Module, splits: DatasetDict, collate: Callable, batch_size: int,
                       device: torch.device, student_task: Optional[Task] = None
                       ) -> tuple[DatasetDict, IndexedRowsCollator]:
    """The splits with the training examples indexed, and a collator that adds their teacher logits. With
    `student_task` (the same examples tokenized by the student's own vocabulary), its splits and collator are the
    ones returned: the teacher reads its tokenization of each text, the student its own."""
    logits = stored_teacher_logits(teacher, splits["train"], collate, batch_size, device)
    if student_task is not None:
        splits, collate = student_task.splits, student_task.collate
    train = splits["train"]
    if len(train) != len(logits):
        raise ValueError(f"the student's training split has {len(train)} examples, the teacher's {len(logits)}")
    indexed = DatasetDict({**splits, "train": train.add_column(CACHE_INDEX, list(range(len(train))))})
    return indexed, IndexedRowsCollator(lambda indices, batch: {TEACHER_LOGITS: logits[indices]}, collate)


def reduce_teacher_precision(teacher: nn.Module, name: str, dataset: Dataset, collate: Callable, batch_size: int,
                             device: torch.device) -> dict[str, float]:
    """Cast the teacher's weights to the dtype `name` (an ensemble's mixing weights stay float32), and measure on
    `dataset` how far that moves its logits: the largest absolute change and the share of unchanged predictions."""
    if name == "float32":
        return {}
    full = teacher_logits(teacher, dataset, collate, batch_size, device)
    members = teacher.teachers if isinstance(teacher, TeacherEnsemble) else [teacher]
    for member in members:
        member.to(getattr(torch, name))
    reduced = teacher_logits(teacher, dataset, collate, batch_size, device)
    return {"max_abs_logit_diff": (full - reduced).abs().max().item(),
            "agreement": (full.argmax(-1) == reduced.argmax(-1)).float().mean().item()}
