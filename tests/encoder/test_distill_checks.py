"""One check per job: the distillation job, the pipeline's distill stage and the recipe tests all run
`check_distill`, whichever method the config chooses. Two drifts of the separate checks this replaced: mutual
learning skipped the logit-cache check (a hidden-state loss with `train.cache_teacher_logits` failed mid-run), and the
pipeline's distill check skipped the teacher-weight and cache checks (a bad `teacher_weights` passed planning). And what
the job reports of its data: the share of each split that max_length cut."""
import json

import pytest

from distill.core.config import DataConfig, LossConfig, StageConfig, StudentConfig, TrainConfig
from distill.core.data import load_splits
from distill.core.errors import ConfigError
from distill.encoder.config import DistillConfig, MutualConfig
from distill.encoder.job import check_distill, distill
from distill.pipeline.plan import PipelineConfig, StageEntry, plan_pipeline
from tests.conftest import train_cfg

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


def shares_by_hand(texts: list[str], max_length: int) -> dict[str, float]:
    """Each word of the tiny vocabulary is one token and the tokenizer adds [CLS] and [SEP]; of the texts longer than
    max_length tokens, the share, and the share of all tokens beyond max_length."""
    lengths = [len(text.split()) + 2 for text in texts]
    beyond = [length - max_length for length in lengths if length > max_length]
    return {"examples": len(beyond) / len(lengths), "tokens": sum(beyond) / sum(lengths)}


def test_metrics_report_the_share_of_each_split_that_max_length_cut(tmp_path, tiny_teacher_dir, sentiment_csv):
    data = DataConfig(source=str(sentiment_csv), text_column="review", label_column="sentiment", max_length=8)
    cfg = DistillConfig(teacher=str(tiny_teacher_dir), output_dir=str(tmp_path / "run"), data=data,
                        student=StudentConfig(layers=[1, 3]), stages=[StageConfig(losses=[LossConfig(name="kl")])],
                        train=train_cfg(max_steps_per_stage=1))
    distill(cfg)
    truncation = json.loads((tmp_path / "run" / "metrics.json").read_text())["truncation"]
    splits = {name: list(split["text"]) for name, split in load_splits(data).items()}
    # texts of 4 to 10 words: some are cut, and some of 6 words fill max_length exactly
    assert any(len(text.split()) == 6 for text in splits["test"])
    assert truncation == {name: shares_by_hand(texts, 8) for name, texts in splits.items()}
