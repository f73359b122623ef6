"""The Accelerate training loop shared by fine-tuning and distillation.

One `Trainer` runs a list of stages (TinyBERT: intermediate layers, then prediction layer). Each stage has its
own losses, optimizer and schedule. Checkpoints (Accelerate `save_state` plus the loop's position) are written
every `save_steps` optimizer steps and at each epoch end; a restarted run resumes from the last one and sees
the same batches, in the same order, as an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from distill.core import sharding
from distill.core.config import StageConfig, TrainConfig
from distill.core.errors import ConfigError
from distill.core.evaluate import ACCURACY, ValidationMetric
from distill.core.fingerprint import weights_sha256
from distill.core.io import save_file_atomic
from distill.core.loss_interface import (
    TEACHER_LOGITS,
    DistillLoss,
    LossInputs,
    LossSetup,
    build_losses,
    model_inputs,
    teacher_inputs,
    token_targets,
)
from distill.core.tracking import log_record, quiet_loggers

with quiet_loggers("bitsandbytes", "kernels"):
    # Its schedulers import transformers' trainer utilities, which import peft and, through it, bitsandbytes when they
    # are installed; bitsandbytes then logs at import that its optional CPU kernel cannot be fetched offline: noise
    # in every run that never quantizes.
    from transformers import get_scheduler
    from transformers.trainer_pt_utils import get_length_grouped_indices


CHECKPOINT_DIR = "checkpoint"
BEST_FILE = "best_student.safetensors"
SHARDED_STATE = "sharded"
SCHEDULER_STATE = "scheduler.json"


def remove_resume_state(run_dir: Path) -> None:
    """The checkpoint and the best epoch's weights, once a run's outputs are safely written."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    (run_dir / BEST_FILE).unlink(missing_ok=True)


class EpochSampler(Sampler[int]):
    """An order that depends only on (seed, epoch), so a resumed run replays the same batches. With `lengths`,
    examples of similar length are batched together (less padding, faster steps), as transformers' Trainer does."""

    def __init__(self, size: int, seed: int, lengths: Optional[list[int]] = None, batch_size: int = 1):
        self.size, self.seed, self.lengths, self.batch_size, self.epoch = size, seed, lengths, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.lengths is not None:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def train_sampler(train_set: Dataset, cfg: TrainConfig, seed: int) -> EpochSampler:
    """The order in which a `Trainer` built with `cfg` and `seed` visits the tokenized `train_set`."""
    lengths = [len(ids) for ids in train_set["input_ids"]] if cfg.group_by_length else None
    return EpochSampler(len(train_set), seed, lengths, cfg.batch_size)


def planned_batches(sampler: EpochSampler, batch_size: int, count: int) -> list[list[int]]:
    """The example indices of the first `count` batches that a loader over `sampler` yields, epoch after epoch as the
    `Trainer` runs them (each epoch's last batch may be short): what another training loop needs to see the same
    batches in the same order."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < count:
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        epoch += 1
    return batches[:count]


class RankTrace:
    """Opt-in record of what each process trained on and ended with, to check data-parallel runs: with the
    environment variable DISTILL_RANK_TRACE naming a folder, process i writes `rank-<i>.json` there, holding the
    token ids of the examples in its first `batches_kept` batches and a SHA-256 of its final student weights."""
    batches_kept = 3

    def __init__(self, folder: Path, rank: int):
        self.path, self.batches = folder / f"rank-{rank}.json", []

    @classmethod
    def from_env(cls, rank: int) -> Optional[RankTrace]:
        folder = os.environ.get("DISTILL_RANK_TRACE")
        return cls(Path(folder), rank) if folder else None

    def record_batch(self, batch: dict[str, torch.Tensor]) -> None:
        if len(self.batches) < self.batches_kept:
            self.batches.append([ids[mask.bool()].tolist()
                                 for ids, mask in zip(batch["input_ids"], batch["attention_mask"])])

    def write(self, model: nn.Module) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"batches": self.batches, "weights_sha256": weights_sha256(model)}))


class Objective(nn.Module):
    """The trained module: the student plus one stage's weighted losses (some own learned projections), whose
    weights and temperatures follow their schedules as `set_progress` moves through the stage."""

    def __init__(self, student: PreTrainedModel, losses: nn.ModuleDict, teacher_head: Optional[nn.Module] = None):
        super().__init__()
        self.student, self.losses = student, losses
        self.reads_heads = any(loss.reads_lm_head for loss in losses.values())
        self.skip_logits = all(loss.reads_lm_head for loss in losses.values())
        self.output_hidden_states = self.reads_heads or any(loss.needs_hidden_states for loss in losses.values())
        self.output_attentions = any(loss.needs_attentions for loss in losses.values())
        self.needs_teacher = any(loss.needs_teacher for loss in losses.values())
        self.teacher_heads = [teacher_head]  # a plain list: the teacher's weights are neither trained nor saved here
        for loss in losses.values():
            loss.attach(student)

    def set_progress(self, progress: float) -> None:
        for loss in self.losses.values():
            loss.progress = progress

    def scheduled_values(self) -> dict[str, float]:
        """`weight_<loss>` / `temperature_<loss>` for each value a schedule moves."""
        return {f"{key}_{name}": value for name, loss in self.losses.items()
                for key, value in loss.scheduled_values().items()}

    def saved_files(self) -> dict[str, str | bytes]:
        """Files the losses add to the saved model folder (early-exit heads)."""
        return {name: data for loss in self.losses.values() for name, data in loss.saved_files().items()}

    def forward(self, batch: dict[str, torch.Tensor], teacher_outputs=None):
        return self.weighted_losses(self.student_outputs(batch), teacher_outputs, batch)

    def student_outputs(self, batch: dict[str, torch.Tensor]):
        return self.student(**model_inputs(batch), **forward_options(self))

    def weighted_losses(self, outputs, teacher_outputs, batch: dict[str, torch.Tensor],
                        peer_logits: Optional[list[torch.Tensor]] = None):
        """The weighted sum of the losses on the student's `outputs`, and each loss's detached value. Losses of one
        `group` run together in one `run_group` call (the causal token losses share each chunk's logits)."""
        heads = (self.student.get_output_embeddings(), self.teacher_heads[0]) if self.reads_heads else (None, None)
        loss_inputs = LossInputs(outputs, teacher_outputs, batch["labels"], batch["attention_mask"], peer_logits,
                                 batch, *heads)
        groups: dict[str, dict[str, DistillLoss]] = {}
        for name, loss in self.losses.items():
            if loss.group is not None:
                groups.setdefault(loss.group, {})[name] = loss
        total, parts = 0.0, {}
        for members in groups.values():
            value, values = type(next(iter(members.values()))).run_group(members, loss_inputs)
            total, parts = total + value, {**parts, **values}
        for name, loss in self.losses.items():
            if loss.group is None:
                value = loss(loss_inputs)
                total = total + loss.weight * value
                parts[name] = value.detach()
        return total, {name: parts[name] for name in self.losses}


def forward_options(objective: nn.Module) -> dict:
    """The keyword arguments of the student's and the teacher's forward that an objective's losses need. Causal token
    losses project the final hidden states through the LM heads a few positions at a time: when every loss does,
    the models compute no logits."""
    options = {"output_hidden_states": objective.output_hidden_states,
               "output_attentions": objective.output_attentions}
    if objective.skip_logits:
        options["logits_to_keep"] = torch.empty(0, dtype=torch.long)
    return options


@dataclass
class TrainState:
    """Where the loop is; saved beside each checkpoint."""
    stage: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Batches of the current epoch already consumed (for skipping on resume)."""
    global_step: int = 0
    """Optimizer steps done in the current stage."""
    best_metric: float = -math.inf
    """The best validation score so far (`ValidationMetric.score`: negated when lower is better)."""
    best_metrics: list[float] = field(default_factory=list)
    """Best validation metric of each student, when a trainer selects several (mutual learning)."""
    processes: int = 1
    """How many processes trained: a resume must use as many (each saved its own data position and shards)."""
    target_tokens: int = 0
    """Next-token targets this process trained on so far, every stage counted (`token_targets`)."""


BatchTransform = Callable[[dict[str, torch.Tensor], TrainState, PreTrainedModel], dict[str, torch.Tensor]]
"""(a training batch, where the loop is, the student) -> the batch trained on: what on-policy distillation uses to
put the student's own completions in place of the data's."""


class Trainer:
    def __init__(
        self,
        accelerator: Accelerator,
        student: PreTrainedModel,
        teacher: Optional[nn.Module],
        datasets: dict[str, Dataset],
        collate: Callable,
        train_cfg: TrainConfig,
        seed: int,
        run_dir: Path,
        on_step: Optional[Callable[[TrainState], None]] = None,
        metric: ValidationMetric = ACCURACY,
        batch_transform: Optional[BatchTransform] = None,
    ):
        self.accelerator, self.student, self.teacher = accelerator, student, teacher
        self.cfg, self.run_dir, self.on_step, self.metric = train_cfg, Path(run_dir), on_step, metric
        self.batch_transform = batch_transform
        train_set = datasets["train"]
        self.collate = collate
        # A private generator: creating a loader iterator must not draw from the global RNG (dropout), or a
        # resumed run, which creates one more iterator mid-epoch, would diverge from an uninterrupted one.
        train_loader = DataLoader(train_set, train_cfg.batch_size, sampler=train_sampler(train_set, train_cfg, seed),
                                  collate_fn=collate, generator=torch.Generator().manual_seed(seed))
        self.train_loader = accelerator.prepare(train_loader)
        self.eval_loader = self.eval_loader_for(datasets["validation"])
        if teacher is not None:
            # Never `prepare`d: each process keeps a full frozen copy outside the wrapped module and its optimizer,
            # or with teacher_placement: shard, its shard (launches that would load it partitioned: run.check_launch).
            teacher.eval().requires_grad_(False)
            if train_cfg.teacher_placement == "shard":
                # fully_shard moves each unit to the device as it shards it: the device never holds the whole teacher
                sharding.shard_model(teacher)
                self.teacher = teacher
            else:
                self.teacher = teacher.to(accelerator.device)
        self.sharded = train_cfg.sharding == "fsdp2"
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.best_path = self.run_dir / BEST_FILE
        # the latest stage's student and losses, with what the losses learned (projections, exit heads)
        self.objective: Optional[Objective] = None
        self.trace = RankTrace.from_env(accelerator.process_index)
        self.memory_per_process: dict[str, int] = {}
        self.target_tokens = 0
        """Next-token targets trained on, by every process together (0 when labels are one per example)."""
        self._stage_parts: tuple = ()  # the stage's objective, optimizer and schedule, for sharded checkpoints

    # ----- public -----------------------------------------------------------------------------------------
    def fit(self, stages: list[StageConfig], setup: LossSetup) -> PreTrainedModel:
        if self.sharded and (len(stages) > 1 or type(self).build_objective is not Trainer.build_objective):
            raise ConfigError(f"train.sharding: fsdp2 trains one student in one stage; {type(self).__name__} runs "
                              f"{len(stages)} stages of its own objective")
        state = self._read_state()
        for index, stage in enumerate(stages):
            if index < state.stage:
                continue
            resuming = index == state.stage and self.checkpoint_dir.exists()
            is_last = index == len(stages) - 1
            fresh = TrainState(stage=index, processes=state.processes, target_tokens=state.target_tokens)
            state = state if resuming else fresh
            self._run_stage(index, stage, setup, state, is_last)
            state = TrainState(stage=index + 1, processes=state.processes, target_tokens=state.target_tokens)
        counted = torch.tensor(state.target_tokens, device=self.accelerator.device)
        self.target_tokens = int(self.accelerator.reduce(counted, "sum"))
        if self.cfg.select_best and self.best_path.exists():
            best = load_file(self.best_path)
            if self.sharded:
                sharding.load_full_state_dict(self.objective, best)
            else:
                self.objective.load_state_dict(best)
        if self.sharded:
            self.student = sharding.gathered_copy(self.student).to(self.accelerator.device)
        self.accelerator.wait_for_everyone()
        if self.trace:
            self.trace.write(self.student)
        return self.student

    def eval_loader_for(self, dataset: Dataset) -> DataLoader:
        loader = DataLoader(dataset, self.cfg.eval_batch_size, collate_fn=self.collate)
        return self.accelerator.prepare(loader)

    def saved_files(self) -> dict[str, str | bytes]:
        """Files the last stage's losses add to the saved model folder (early-exit heads)."""
        return self.objective.saved_files() if self.objective is not None else {}

    def build_objective(self, stage: StageConfig, setup: LossSetup) -> nn.Module:
        """The module one stage trains; a training strategy (such as mutual learning) overrides it."""
        teacher_head = self.teacher.get_output_embeddings() if isinstance(self.teacher, PreTrainedModel) else None
        return Objective(self.student, build_losses(stage.losses, setup), teacher_head)

    def cleanup(self) -> None:
        """Remove resume state once the run's outputs are safely written."""
        if self.accelerator.is_main_process:
            remove_resume_state(self.run_dir)

    def log(self, record: dict) -> None:
        """Append `record` to metrics.jsonl, and send its numbers to the configured trackers (`train.report_to`)."""
        log_record(self.accelerator, self.run_dir, record)

    # ----- one stage ----------------------------------------------------------------------------------------
    def _run_stage(self, index: int, stage: StageConfig, setup: LossSetup, state: TrainState, is_last: bool):
        acc, cfg = self.accelerator, self.cfg
        self.objective = self.build_objective(stage, setup)
        if self.sharded:  # before the optimizer is built: it keeps the shards
            sharding.shard_model(self.objective.student, root=self.objective)
        optimizer = torch.optim.AdamW(param_groups(self.objective, cfg.weight_decay), lr=stage.learning_rate)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.gradient_accumulation_steps)
        total_steps = math.ceil(stage.epochs * steps_per_epoch)
        if cfg.max_steps_per_stage is not None:
            total_steps = min(total_steps, cfg.max_steps_per_stage)
        # Accelerate steps a prepared scheduler once per process for each optimizer step.
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer,
            num_warmup_steps=round(cfg.warmup_ratio * total_steps) * acc.num_processes,
            num_training_steps=total_steps * acc.num_processes,
        )
        objective, optimizer, scheduler = self._prepare(optimizer, scheduler)
        if state.global_step or state.epoch:
            self._load_checkpoint()
        select_best = cfg.select_best and is_last
        bar = tqdm(total=total_steps, initial=state.global_step, desc=f"stage {index} ({stage.name})",
                   disable=not acc.is_local_main_process)
        running: dict[str, float] = {}
        objective.train()
        while state.global_step < total_steps:
            for batch in self._remaining_batches(state):
                unwrapped = acc.unwrap_model(objective)
                if self.batch_transform:
                    batch = self.batch_transform(batch, state, unwrapped.student)
                if self.trace:
                    self.trace.record_batch(batch)
                state.target_tokens += token_targets(batch["labels"])
                unwrapped.set_progress(state.global_step / total_steps)
                with acc.accumulate(objective):
                    if self.sharded:  # reduce-scatter gradients only on the batch that steps
                        objective.set_requires_gradient_sync(acc.sync_gradients)
                    loss, parts = objective(batch, self._teacher_outputs(batch, unwrapped))
                    if sharding.is_sharded(self.teacher):
                        self.teacher.reshard()
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state.batches_done += 1
                for name, value in {"loss": loss.detach(), **parts}.items():
                    running[name] = running.get(name, 0.0) + value.item()
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                bar.update(1)
                if state.global_step == 1:
                    self._measure_memory(objective, optimizer)
                if state.global_step % cfg.log_steps == 0:
                    record = self._log_running(running, index, state, scheduler.get_last_lr()[0],
                                               unwrapped.scheduled_values())
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}")
                    running = {}
                if self.on_step:
                    self.on_step(state)
                if state.global_step >= total_steps:
                    break
                if state.global_step % cfg.save_steps == 0:
                    self._save_checkpoint(state)
            self._evaluate_and_keep_best(index, state, select_best)
            if state.batches_done >= len(self.train_loader):
                state.epoch += 1
                state.batches_done = 0
            self._save_checkpoint(state)
        bar.close()
        self.student = acc.unwrap_model(objective).student
        acc.free_memory()

    def _prepare(self, optimizer, scheduler) -> tuple:
        """The objective, optimizer and schedule as the loop uses them. Sharded, the objective is sharded in place and
        the optimizer and schedule are wrapped as `prepare` would wrap them, but not registered with Accelerate, whose
        `save_state` would write only the main process's optimizer shards (the trainer saves them itself)."""
        acc = self.accelerator
        if not self.sharded:
            parts = acc.prepare(self.objective, optimizer, scheduler)
        else:
            optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
            scheduler = AcceleratedScheduler(scheduler, optimizer, split_batches=acc.split_batches)
            parts = self.objective, optimizer, scheduler
        self._stage_parts = parts
        return parts

    def _remaining_batches(self, state: TrainState):
        """This epoch's batches, less those a resumed run already consumed."""
        self.train_loader.set_epoch(state.epoch)
        if not state.batches_done:
            return self.train_loader
        batches = self.accelerator.skip_first_batches(self.train_loader, state.batches_done)
        batches.set_epoch(state.epoch)
        return batches

    def _evaluate_and_keep_best(self, index: int, state: TrainState, select_best: bool) -> None:
        value = self.metric.compute(self.student, self.eval_loader, self.accelerator)
        self.log({"stage": index, "epoch": state.epoch, "step": state.global_step,
                  f"validation_{self.metric.name}": value})
        if select_best and self.metric.score(value) > state.best_metric:
            state.best_metric = self.metric.score(value)
            # the losses' state too, so that exit heads and projections match the weights kept
            weights = sharding.full_state_dict(self.objective) if self.sharded else self.objective.state_dict()
            if self.accelerator.is_main_process:
                save_file_atomic(weights, self.best_path)

    # ----- helpers ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _teacher_outputs(self, batch: dict[str, torch.Tensor], objective: Objective):
        if TEACHER_LOGITS in batch:
            return SequenceClassifierOutput(logits=batch[TEACHER_LOGITS])
        if self.teacher is None or not objective.needs_teacher:
            return None
        with self.accelerator.autocast():
            return self.teacher(**teacher_inputs(batch), **forward_options(objective))

    def _log_running(self, running: dict[str, float], index: int, state: TrainState, lr: float,
                     scheduled: dict[str, float]) -> dict:
        batches = self.cfg.log_steps * self.cfg.gradient_accumulation_steps
        record = {"stage": index, "epoch": state.epoch, "step": state.global_step, "lr": lr, **scheduled}
        record.update({f"train_{name}": value / batches for name, value in running.items()})
        self.log(record)
        return record

    def _read_state(self) -> TrainState:
        path = self.checkpoint_dir / "trainer_state.json"
        if not path.is_file():
            return TrainState(processes=self.accelerator.num_processes)
        state = TrainState(**json.loads(path.read_text()))
        if state.processes != self.accelerator.num_processes:
            raise ConfigError(f"{self.checkpoint_dir} was written by {state.processes} processes; this launch has "
                              f"{self.accelerator.num_processes}: resume with num_processes: {state.processes}, or "
                              "choose another output_dir")
        return state

    def _load_checkpoint(self) -> None:
        self.accelerator.load_state(str(self.checkpoint_dir))
        if self.sharded:
            objective, optimizer, scheduler = self._stage_parts
            sharding.load_sharded(str(self.checkpoint_dir / SHARDED_STATE), objective, optimizer.optimizer)
            scheduler.scheduler.load_state_dict(json.loads((self.checkpoint_dir / SCHEDULER_STATE).read_text()))

    def _measure_memory(self, objective: nn.Module, optimizer) -> None:
        """After a stage's first optimizer step: the bytes of weights, gradients and optimizer state that each process
        holds (the largest over processes), the trained module's and the teacher's, kept in `memory_per_process`."""
        held = sharding.state_bytes(objective, optimizer)
        if self.teacher is not None:
            held["teacher"] = sharding.local_bytes(self.teacher.parameters())
        values = self.accelerator.reduce(torch.tensor(list(held.values()), device=self.accelerator.device), "max")
        held = dict(zip(held, values.tolist()))
        self.memory_per_process = {**held, "total": sum(held.values())}

    def _save_checkpoint(self, state: TrainState) -> None:
        """Write the checkpoint beside the old one, then swap, so a kill never leaves a half-written one."""
        acc = self.accelerator
        tmp = self.checkpoint_dir.with_name("checkpoint.tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.sharded:
            objective, optimizer, scheduler = self._stage_parts
            sharding.save_sharded(str(tmp / SHARDED_STATE), objective, optimizer.optimizer)
        acc.wait_for_everyone()  # every process writes its own RNG state into `tmp` before it is renamed
        if acc.is_main_process:
            if self.sharded:
                (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.scheduler.state_dict()))
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
            old = self.checkpoint_dir.with_name("checkpoint.old")
            if self.checkpoint_dir.exists():
                self.checkpoint_dir.rename(old)
            tmp.rename(self.checkpoint_dir)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups: weight decay except on biases and norms; a loss with its own `learning_rate`
    gets its parameters in groups of their own."""
    own_rate = {id(param): loss.spec.learning_rate for loss in module.modules()
                if isinstance(loss, DistillLoss) and loss.spec.learning_rate is not None
                for param in loss.parameters()}
    groups: dict[tuple, list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)
        groups.setdefault((decays, own_rate.get(id(param))), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             **({"lr": rate} if rate is not None else {})} for (decays, rate), params in groups.items()]
