"""The pipeline stage kinds that `distill` provides: `finetune` (a task teacher), `distill` (a student from the
previous stage's model as teacher), `general_distill` (a small encoder distilled from a base encoder on unlabelled
text, which a later `distill` stage names as its `student.model`), `distill_lm` (a causal-LM student, the previous
stage's model, for instance a pruned one, distilled from `teacher`), `draft` (the same job, for a speculative-decoding
draft of `teacher`: its student proposes the teacher's own tokens and is measured as its draft;
recipes/distill_lm_draft.yaml) and `push` (upload to the Hub)."""
from __future__ import annotations

from distill.core.errors import ConfigError
from distill.encoder.config import DistillConfig
from distill.encoder.finetune import FINETUNE
from distill.encoder.general import GENERAL_DISTILL
from distill.encoder.job import DISTILL
from distill.lm.config import LMDistillConfig
from distill.lm.job import LM_DISTILL
from distill.pipeline.hub import PUSH
from distill.pipeline.plan import REPORT_KINDS, StageKind, register_stage


def distill_outputs(cfg: DistillConfig) -> dict[str, str]:
    """Born-again chains keep each generation in its own folder; the last one's student is the result."""
    return {"model": "model" if cfg.generations == 1 else f"generation-{cfg.generations}/model"}


def check_draft(cfg: LMDistillConfig) -> None:
    """A draft must propose its teacher's own token ids, and its stage measures how often the teacher accepts them."""
    LM_DISTILL.check(cfg)
    if cfg.student_tokenizer:
        raise ConfigError("draft: the student must propose the teacher's own token ids, and student_tokenizer gives it "
                          "another vocabulary")
    if cfg.eval.draft_prompts < 1:
        raise ConfigError("draft: the stage measures the student's acceptance as the teacher's draft; "
                          "eval.draft_prompts must be at least 1")


def run_training_job(job):
    """A stage that runs a training job, which may be killed and resumed (`StageContext.on_step`)."""
    return lambda cfg, context: job.run(cfg, context.on_step).metrics


register_stage("finetune", StageKind.of_job(FINETUNE, run_training_job(FINETUNE), input_field="model"))
register_stage("distill", StageKind.of_job(DISTILL, run_training_job(DISTILL), input_field="teacher",
                                           outputs=distill_outputs))
register_stage("general_distill", StageKind.of_job(GENERAL_DISTILL, run_training_job(GENERAL_DISTILL),
                                                   input_field="teacher"))
register_stage("push", StageKind.of_job(PUSH, lambda cfg, context: PUSH.run(cfg), input_field="model",
                                        outputs=lambda cfg: {}, after=REPORT_KINDS))
register_stage("distill_lm", StageKind.of_job(LM_DISTILL, run_training_job(LM_DISTILL), input_field="student.model"))
register_stage("draft", StageKind(LMDistillConfig, run_training_job(LM_DISTILL), input_field="student.model",
                                  check=check_draft))
