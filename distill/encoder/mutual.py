"""Online distillation by deep mutual learning (Zhang et al. 2018): `student` and `mutual.peers` are trained
together, each on its stage losses (teacher losses included, when a stage lists them), and the `peer_kl` loss
distils each student from the others' softened predictions.

The students form one `Cohort` module inside one `MutualObjective`, so the shared `Trainer` loop, one optimizer,
Accelerate (DDP included), checkpoints and resume serve them unchanged; `MutualTrainer` only evaluates, logs and
keeps the best epoch per student. Student 0 is `student` (saved to `model/`, metrics without a suffix); student
i + 1 is `mutual.peers[i]` (saved to `peer-<i>/model`, metrics with the suffix `_peer<i>`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from distill.core.config import StageConfig
from distill.core.evaluate import accuracy, count_parameters
from distill.core.io import save_file_atomic
from distill.core.loss_interface import LossSetup, build_losses
from distill.core.run import OnStep, RunResult, finish_run, measure_and_save
from distill.core.trainer import Objective, Trainer, TrainState
from distill.encoder.config import DistillConfig
from distill.encoder.single import prepare


def student_suffix(index: int) -> str:
    """What names the cohort's student `index` in logs and metrics: nothing for `student`, `_peer<i>` for peer i."""
    return "" if index == 0 else f"_peer{index - 1}"


class Cohort(nn.Module):
    """The students trained together: `members[0]` is `student`, `members[i + 1]` is `mutual.peers[i]`."""

    def __init__(self, members: list[PreTrainedModel]):
        super().__init__()
        self.members = nn.ModuleList(members)


class MutualObjective(nn.Module):
    """Each student's stage losses, with the other students' logits given to its `peer_kl` loss as targets.

    One optimizer steps all students: peer targets are detached, so each student's gradient comes from its own loss
    terms alone, and AdamW keeps its statistics per parameter; only gradient clipping (`train.max_grad_norm`) sees
    the students' gradients together, as one norm."""

    def __init__(self, cohort: Cohort, objectives: list[Objective]):
        super().__init__()
        self.student = cohort
        self.losses = nn.ModuleList(objective.losses for objective in objectives)
        self.objectives = objectives  # a plain list: their students and losses are registered above, once
        self.needs_teacher = any(objective.needs_teacher for objective in objectives)
        self.output_hidden_states = any(objective.output_hidden_states for objective in objectives)
        self.output_attentions = any(objective.output_attentions for objective in objectives)
        self.skip_logits = False  # peer_kl reads the students' logits

    def set_progress(self, progress: float) -> None:
        for objective in self.objectives:
            objective.set_progress(progress)

    def scheduled_values(self) -> dict[str, float]:
        """Every student's losses follow the same schedules: the values are those of student 0."""
        return self.objectives[0].scheduled_values()

    def student_state(self, k: int) -> dict[str, torch.Tensor]:
        """The entries of this module's state dict that belong to student `k`: its weights and its losses'."""
        return {**self.student.members[k].state_dict(prefix=f"student.members.{k}."),
                **self.losses[k].state_dict(prefix=f"losses.{k}.")}

    def forward(self, batch: dict[str, torch.Tensor], teacher_outputs=None):
        outputs = [objective.student_outputs(batch) for objective in self.objectives]
        total, parts = 0.0, {}
        for k, objective in enumerate(self.objectives):
            peer_logits = [output.logits for j, output in enumerate(outputs) if j != k]
            loss, own_parts = objective.weighted_losses(outputs[k], teacher_outputs, batch, peer_logits)
            total = total + loss
            parts.update({name + student_suffix(k): value for name, value in own_parts.items()})
        return total, parts


class MutualTrainer(Trainer):
    """The shared loop on a `Cohort`: `fit` takes one `LossSetup` per student. Each epoch every student is evaluated,
    and with `select_best` each keeps the weights of its own best epoch (students are used separately afterwards,
    so a common epoch chosen by the mean would shortchange the better one)."""

    def build_objective(self, stage: StageConfig, setup: list[LossSetup]) -> MutualObjective:
        objectives = [Objective(member, build_losses(stage.losses, member_setup))
                      for member, member_setup in zip(self.student.members, setup)]
        return MutualObjective(self.student, objectives)

    def _evaluate_and_keep_best(self, index: int, state: TrainState, select_best: bool) -> None:
        metrics = [accuracy(member, self.eval_loader, self.accelerator) for member in self.student.members]
        self.log({"stage": index, "epoch": state.epoch, "step": state.global_step,
                  **{f"validation_accuracy{student_suffix(k)}": metric for k, metric in enumerate(metrics)}})
        if not select_best:
            return
        best = state.best_metrics or [-math.inf] * len(metrics)
        improved = [k for k, metric in enumerate(metrics) if metric > best[k]]
        state.best_metrics = [max(metric, previous) for metric, previous in zip(metrics, best)]
        if improved and self.accelerator.is_main_process:
            self._save_best_of(improved)

    def _save_best_of(self, improved: list[int]) -> None:
        """Replace the state of the `improved` students in the best-state file; the others keep theirs."""
        kept = load_file(self.best_path) if self.best_path.exists() else {}
        current = {name: value for k in improved for name, value in self.objective.student_state(k).items()}
        save_file_atomic({**kept, **current}, self.best_path)

    def saved_files(self, student: int = 0) -> dict[str, str | bytes]:
        """Files the last stage's losses of student `student` add to its saved folder (early-exit heads)."""
        return self.objective.objectives[student].saved_files()


@dataclass
class MutualResult(RunResult):
    peers: list[PreTrainedModel] = field(default_factory=list)
    """The trained peers, in `mutual.peers` order (`model` is `student`)."""


def distill_mutual(cfg: DistillConfig, on_step: OnStep = None) -> MutualResult:
    """Build `student` and each of `mutual.peers`, train them together through every stage (against the teacher or
    teachers, when a stage has teacher losses), then measure and save each."""
    run = prepare(cfg, [cfg.student, *cfg.mutual.peers])
    students, setups = run.students, run.setups
    trainer = MutualTrainer(run.accelerator, Cohort(students), run.teacher, run.splits, run.collate, cfg.train,
                            cfg.seed, run.run_dir, on_step)
    trainer.log({**run.about_teacher,
                 **{f"student_parameters{student_suffix(k)}": count_parameters(s) for k, s in enumerate(students)},
                 **{f"layer_map{student_suffix(k)}": setup.layer_map.hidden for k, setup in enumerate(setups)}})
    student, *peers = trainer.fit(cfg.stages, setups).members
    for model in (student, *peers):
        model.set_attn_implementation("sdpa")
    peer_metrics = {}
    batch_size = cfg.train.eval_batch_size
    for i, peer in enumerate(peers):
        measured = measure_and_save(run.accelerator, peer, run.task, batch_size, run.run_dir / f"peer-{i}" / "model",
                                    files=trainer.saved_files(i + 1))
        peer_metrics.update({name + student_suffix(i + 1): value for name, value in measured.items()})
    result = finish_run(run.accelerator, run.run_dir, student, run.task, batch_size, files=trainer.saved_files(),
                        extra=peer_metrics)
    return MutualResult(result.model, result.metrics, result.run_dir, list(peers))
