"""The pipeline stages `distill` provides: `finetune` (a task teacher), `distill` (a student from the previous
stage's model as teacher) and `push` (upload to the Hub)."""
from __future__ import annotations

from .config import DistillConfig, FinetuneConfig, PushConfig
from .generations import check_generations
from .hub import check_push_config, push_folder
from .pipeline import StageContext, StageKind, register_stage
from .run import check_stages, distill, finetune


def run_finetune(cfg: FinetuneConfig, context: StageContext) -> dict:
    return finetune(cfg, context.on_step).metrics


def run_distill(cfg: DistillConfig, context: StageContext) -> dict:
    return distill(cfg, context.on_step).metrics


def distill_outputs(cfg: DistillConfig) -> dict[str, str]:
    """Born-again chains keep each generation in its own folder; the last one's student is the result."""
    return {"model": "model" if cfg.generations == 1 else f"generation-{cfg.generations}/model"}


def check_distill_config(cfg: DistillConfig) -> None:
    check_generations(cfg)
    check_stages(cfg.stages, peers=len(cfg.mutual.peers))


def run_push(cfg: PushConfig, context: StageContext) -> dict:
    return push_folder(cfg)


register_stage("finetune", StageKind(FinetuneConfig, run_finetune, input_field="model",
                                     check=lambda cfg: check_stages([cfg.stage])))
register_stage("distill", StageKind(DistillConfig, run_distill, input_field="teacher", outputs=distill_outputs,
                                    check=check_distill_config))
register_stage("push", StageKind(PushConfig, run_push, input_field="model", outputs=lambda cfg: {},
                                 check=check_push_config, after="report"))
