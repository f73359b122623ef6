"""The teacher job: fine-tune a model (for example a headless offline encoder) on a classification task, adding a
fresh classification head if it has none. Not a distillation method, but the same runtime: stages of losses (`ce`),
checkpoints, resume, evaluation."""
from __future__ import annotations

import distill.losses  # noqa: F401  (registers the losses a stage names)
from distill.core.jobs import Job, register_job
from distill.core.loss_interface import LossSetup, check_stages
from distill.core.models import load_classifier
from distill.core.run import OnStep, RunResult, check_train, finish_run, load_task, start_run
from distill.core.trainer import Trainer
from distill.encoder.config import FinetuneConfig


def check_finetune(cfg: FinetuneConfig) -> None:
    check_stages([cfg.stage])
    check_train(cfg.train)


def finetune(cfg: FinetuneConfig, on_step: OnStep = None) -> RunResult:
    check_finetune(cfg)
    accelerator, run_dir = start_run(cfg)
    task = load_task(cfg.data, cfg.model)
    model = load_classifier(
        cfg.model, num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)), label2id={name: i for i, name in enumerate(task.labels)},
    )
    trainer = Trainer(accelerator, model, None, task.splits, task.collate, cfg.train, cfg.seed, run_dir, on_step)
    model = trainer.fit([cfg.stage], LossSetup(model.config, None, None))
    return finish_run(accelerator, run_dir, model, task, cfg.train.eval_batch_size, files=trainer.saved_files())


FINETUNE = register_job(Job("finetune", FinetuneConfig, check_finetune, finetune,
                            lambda cfg, result: {"teacher": f"{cfg.output_dir}/model", **result.metrics}))
