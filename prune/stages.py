"""The pipeline stage `prune` provides: prune the previous stage's model and recover it by distillation from the
unpruned model (or from `teacher`, e.g. `teacher: "@finetune"`)."""
from __future__ import annotations

from distill.pipeline import StageContext, StageKind, register_stage

from .config import PruneConfig
from .run import check_prune_config, prune


def run_prune(cfg: PruneConfig, context: StageContext) -> dict:
    return prune(cfg, context.on_step).metrics


register_stage("prune", StageKind(PruneConfig, run_prune, input_field="model", check=check_prune_config))
