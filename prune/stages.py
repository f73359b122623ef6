"""The pipeline stage kinds `prune` provides: `prune` (prune the previous stage's classifier and recover it by
distillation from the unpruned model, or from `teacher`, e.g. `teacher: "@finetune"`) and `prune_lm` (prune a causal
LM; a `distill_lm` stage after it recovers it)."""
from __future__ import annotations

from distill.pipeline.plan import StageKind, register_stage
from prune.lm import PRUNE_LM
from prune.run import PRUNE

register_stage("prune", StageKind.of_job(PRUNE, lambda cfg, context: PRUNE.run(cfg, context.on_step).metrics,
                                         input_field="model"))
register_stage("prune_lm", StageKind.of_job(PRUNE_LM, lambda cfg, context: PRUNE_LM.run(cfg).metrics,
                                            input_field="model"))
