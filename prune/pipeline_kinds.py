"""The pipeline stage kind `prune` provides: prune the previous stage's model and recover it by distillation from the
unpruned model (or from `teacher`, e.g. `teacher: "@finetune"`)."""
from __future__ import annotations

from distill.pipeline.plan import StageKind, register_stage

from .run import PRUNE

register_stage("prune", StageKind.of_job(PRUNE, lambda cfg, context: PRUNE.run(cfg, context.on_step).metrics,
                                         input_field="model"))
