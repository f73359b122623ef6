"""Cached teacher logits (`train.cache_teacher_logits`) and a reduced-precision teacher (`train.teacher_dtype`) on
tiny models: the cache trains as the live teacher does, through shuffling, epochs and resume."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from distill.core.config import LossConfig, StageConfig, StudentConfig
from distill.core.errors import ConfigError
from distill.encoder.config import DistillConfig, FinetuneConfig
from distill.encoder.finetune import finetune
from distill.encoder.job import distill
from tests.conftest import data_cfg, train_cfg

RESPONSE_LOSSES = [LossConfig(name="kl", temperature=2.0), LossConfig(name="ce", weight=0.5)]


def response_cfg(csv, teacher, out, losses=RESPONSE_LOSSES, **train):
    return DistillConfig(teacher=str(teacher), output_dir=str(out), data=data_cfg(csv),
                         student=StudentConfig(layers=[1, 3]),
                         stages=[StageConfig(epochs=2, learning_rate=1e-3, losses=losses)],
                         train=train_cfg(log_steps=1, select_best=False, **train))


def logged_losses(run_dir):
    """(kl, ce) of each step; a resumed run logs again the steps after its checkpoint, the later record counts."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {line["step"]: (line["train_kl"], line["train_ce"]) for line in lines if "train_kl" in line}
    return [by_step[step] for step in sorted(by_step)]


class Interrupt(Exception):
    pass


def test_cached_logits_train_as_the_live_teacher_through_epochs_and_resume(new_process, trained_teacher, sentiment_csv,
                                                                           tmp_path):
    teacher = trained_teacher.run_dir / "model"
    live = distill(response_cfg(sentiment_csv, teacher, tmp_path / "live"))
    new_process()
    cached_cfg = response_cfg(sentiment_csv, teacher, tmp_path / "cached", cache_teacher_logits=True)

    def kill(state):  # in the second epoch, after the first epoch's checkpoint
        if state.global_step == 11:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(cached_cfg, on_step=kill)
    new_process()
    cached = distill(cached_cfg)

    live_losses, cached_losses = logged_losses(live.run_dir), logged_losses(cached.run_dir)
    assert len(live_losses) == 18  # 2 epochs of 9 shuffled, length-grouped batches
    assert torch.allclose(torch.tensor(cached_losses), torch.tensor(live_losses), atol=1e-5)
    # weights with no gradient but rounding noise (key biases) move apart under Adam: compare what the students predict
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    batch = tokenizer(["the film was good", "a dull and boring plot", "very lovely acting"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(live.model.eval()(**batch).logits, cached.model.eval()(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("loss, reads", [("hidden_mse", "hidden states"), ("attention_kl", "attention maps")])
def test_cached_logits_refuse_losses_that_read_more_of_the_teacher(trained_teacher, sentiment_csv, tmp_path, loss,
                                                                    reads):
    cfg = response_cfg(sentiment_csv, trained_teacher.run_dir / "model", tmp_path / "out",
                       losses=[LossConfig(name="kl"), LossConfig(name=loss)], cache_teacher_logits=True)
    with pytest.raises(ConfigError, match=f"loss '{loss}' \\(stages\\[0\\]\\) reads its {reads}"):
        distill(cfg)


def test_cached_logits_need_a_loss_that_reads_the_teacher(sentiment_csv, tiny_teacher_dir, tmp_path):
    cfg = response_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "out", losses=[LossConfig(name="ce")],
                       cache_teacher_logits=True)
    with pytest.raises(ConfigError, match="no loss reads the teacher"):
        distill(cfg)


def test_bfloat16_teacher_trains_and_logs_how_far_its_logits_moved(sentiment_csv, tiny_teacher_dir, tmp_path):
    losses = [*RESPONSE_LOSSES, LossConfig(name="hidden_mse"), LossConfig(name="attention_mse")]
    cfg = response_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "out", losses=losses, teacher_dtype="bfloat16",
                       max_steps_per_stage=2)
    result = distill(cfg)
    assert next(result.model.parameters()).dtype == torch.float32
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    drift = lines[0]["teacher_dtype_drift"]
    assert 0 < drift["max_abs_logit_diff"] < 0.1 and 0.9 <= drift["agreement"] <= 1
    assert all(torch.isfinite(torch.tensor(value)) for line in lines[1:] for key, value in line.items()
               if key.startswith("train_"))


def test_teacher_options_are_checked(sentiment_csv, tiny_teacher_dir, tmp_path):
    cfg = response_cfg(sentiment_csv, tiny_teacher_dir, tmp_path / "out", teacher_dtype="bf16")
    with pytest.raises(ConfigError, match="train.teacher_dtype must be one of float32, bfloat16, float16; got 'bf16'"):
        distill(cfg)
    finetune_cfg = FinetuneConfig(model=str(tiny_teacher_dir), output_dir=str(tmp_path / "ft"),
                                  data=data_cfg(sentiment_csv), train=train_cfg(cache_teacher_logits=True))
    with pytest.raises(ConfigError, match="train.cache_teacher_logits: this job does not read it"):
        finetune(finetune_cfg)
