"""One check per job: the distillation job, the pipeline's distill stage and the recipe tests all run
`check_distill`, whichever method the config chooses. Two drifts of the separate checks this replaced: mutual
learning skipped the logit-cache check (a hidden-state loss with `train.cache_teacher_logits` failed mid-run), and the
pipeline's distill check skipped the teacher-weight and cache checks (a bad `teacher_weights` passed planning)."""
import pytest

import distill.pipeline.kinds  # noqa: F401  (registers the stage kinds)
from distill.core.config import LossConfig, StageConfig, StudentConfig, TrainConfig
from distill.core.errors import ConfigError
from distill.methods.config import DistillConfig, MutualConfig
from distill.methods.job import check_distill, distill
from distill.pipeline.plan import PipelineConfig, StageEntry, plan_pipeline

CACHE_AND_HIDDEN = "train.cache_teacher_logits keeps only the teacher's logits, but loss 'hidden_mse'"


def mutual_cfg(tmp_path, teacher: str) -> DistillConfig:
    losses = [LossConfig(name="kl"), LossConfig(name="hidden_mse"), LossConfig(name="peer_kl")]
    return DistillConfig(teacher=teacher, output_dir=str(tmp_path / "run"), stages=[StageConfig(losses=losses)],
                         mutual=MutualConfig(peers=[StudentConfig()]), train=TrainConfig(cache_teacher_logits=True))


def test_mutual_learning_refuses_a_hidden_state_loss_with_cached_logits_before_loading(tmp_path, tiny_teacher_dir):
    cfg = mutual_cfg(tmp_path, str(tiny_teacher_dir))
    with pytest.raises(ConfigError, match=CACHE_AND_HIDDEN):
        check_distill(cfg)
    with pytest.raises(ConfigError, match=CACHE_AND_HIDDEN):
        distill(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run started


def pipeline_with(tiny_teacher_dir, tmp_path, **distill_overrides) -> PipelineConfig:
    return PipelineConfig(output_dir=str(tmp_path / "pipeline"), stages=[
        StageEntry(kind="distill", model=str(tiny_teacher_dir), overrides=distill_overrides)])


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_weights=[1.0, 2.0]), r"teacher_weights lists 2 weights for 1 teachers"),
    (dict(train={"cache_teacher_logits": True}, stages=[{"losses": [{"name": "kl"}, {"name": "hidden_mse"}]}]),
     CACHE_AND_HIDDEN),
    (dict(mutual={"peers": [{}]}, train={"cache_teacher_logits": True},
          stages=[{"losses": [{"name": "hidden_mse"}, {"name": "peer_kl"}]}]), CACHE_AND_HIDDEN),
])
def test_the_pipeline_plans_a_distill_stage_with_the_jobs_own_check(tiny_teacher_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=rf"stage 1 \('distill'\): {message}"):
        plan_pipeline(pipeline_with(tiny_teacher_dir, tmp_path, **overrides))
    assert not (tmp_path / "pipeline").exists()
