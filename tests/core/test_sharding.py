"""Fully sharded training (`train.sharding: fsdp2`) with two real CPU processes (gloo): the causal-LM job (fused
chunked losses reading both LM heads, teacher sharded too) and the encoder job end with the weights of the
one-process run; a sharded run killed mid-training resumes to the same weights; each process holds about half the
weights, gradients and optimizer state of a data-parallel one; launches and settings that cannot work are refused."""
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.core.config import CorpusConfig, LossConfig, StageConfig, StudentConfig, parse_args
from distill.core.errors import ConfigError
from distill.encoder import job as encoder_job
from distill.encoder.config import DistillConfig
from distill.lm.config import LMDistillConfig, OnPolicyConfig
from distill.lm.job import distill_lm
from tests.conftest import REPO, data_cfg, launch_two_processes, never_train, save_tiny_teacher, train_cfg
from tests.helpers.lm_runs import WORDS, lm_cfg, save_lm

LM_RECIPE, ENCODER_RECIPE = REPO / "recipes" / "distill_lm.py", REPO / "recipes" / "distill_student.py"
SHARDED = {"sharding": "fsdp2", "teacher_placement": "shard"}
KILL_AT = """import sys
from distill.core.config import parse_args
from distill.lm.config import LMDistillConfig
from distill.lm.job import distill_lm


def stop(state):
    if state.global_step == 4:
        raise SystemExit(3)


distill_lm(parse_args(LMDistillConfig, sys.argv[1:]), on_step=stop)
"""


@pytest.fixture
def lm_setup(tmp_path):
    """A 2-layer teacher, and a corpus whose lines all have 12 tokens: each process's loss is a mean over the same
    number of tokens, so the mean of the two processes' gradients is the one-process run's."""
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(80)) + "\n")
    return save_lm(tmp_path / "teacher", WORDS), corpus


def lm_values(tmp_path, teacher, corpus, name: str, batch_size: int, **train) -> dict:
    return {"teacher": str(teacher), "output_dir": str(tmp_path / name),
            "data": {"source": str(corpus), "max_length": 16}, "validation_examples": 8, "test_examples": 8,
            "student": {"layers": [1]},
            "stages": [{"epochs": 1, "learning_rate": 1e-2,
                        "losses": [{"name": "forward_kl", "weight": 0.5}, {"name": "next_token_ce", "weight": 0.5}]}],
            "eval": {"prompts": ["the film was"], "max_new_tokens": 4},
            # clipping at every step: the norm must be the whole model's, not a shard's
            "train": {"batch_size": batch_size, "eval_batch_size": 8, "max_steps_per_stage": 6, "save_steps": 2,
                      "log_steps": 1, "group_by_length": False, "max_grad_norm": 0.05, **train}}


def write_config(tmp_path, values: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(script, config, tmp_path, expect_ok: bool = True):
    done = launch_two_processes(script, ["--config", str(config)], tmp_path)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def saved_weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_close_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol), f"{name} differs"


def memory(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["memory_per_process_bytes"]


def test_sharded_causal_lm_run_matches_one_process_with_half_the_state_per_process(lm_setup, tmp_path):
    teacher, corpus = lm_setup
    one = lm_values(tmp_path, teacher, corpus, "one", 8)
    distill_lm(parse_args(LMDistillConfig, ["--config", str(write_config(tmp_path, one, "one"))]))
    launch(LM_RECIPE, write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "ddp", 4), "ddp"), tmp_path)
    launch(LM_RECIPE, write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "fsdp", 4, **SHARDED), "fsdp"),
           tmp_path)

    sharded = saved_weights(tmp_path / "fsdp")
    assert_close_weights(sharded, saved_weights(tmp_path / "one"))
    assert not torch.equal(sharded["model.layers.0.mlp.up_proj.weight"],
                           load_file(teacher / "model.safetensors")["model.layers.1.mlp.up_proj.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.tie_word_embeddings
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "fsdp")}
    assert metrics["fsdp"]["test_perplexity"] == pytest.approx(metrics["one"]["test_perplexity"], rel=1e-4)

    ddp, fsdp = memory(tmp_path / "ddp"), memory(tmp_path / "fsdp")
    assert ddp == memory(tmp_path / "one")  # data parallel: each process holds what one process does
    for part in ("weights", "gradients", "optimizer", "teacher"):
        assert fsdp[part] <= 0.55 * ddp[part], part
    assert fsdp["total"] <= 0.6 * ddp["total"]


def test_sharded_gradient_accumulation_matches_one_process(lm_setup, tmp_path):
    teacher, corpus = lm_setup  # 2 processes x 2 batches of 2 per step: the one-process batch of 8, in four parts
    one = lm_values(tmp_path, teacher, corpus, "one", 8)
    distill_lm(parse_args(LMDistillConfig, ["--config", str(write_config(tmp_path, one, "one"))]))
    accumulated = lm_values(tmp_path, teacher, corpus, "accumulated", 2, gradient_accumulation_steps=2, **SHARDED)
    launch(LM_RECIPE, write_config(tmp_path, accumulated, "accumulated"), tmp_path)
    assert_close_weights(saved_weights(tmp_path / "accumulated"), saved_weights(tmp_path / "one"))


def test_a_bfloat16_teacher_halves_the_teachers_share(lm_setup, tmp_path):
    teacher, corpus = lm_setup
    launch(LM_RECIPE, write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "bf16", 4, sharding="fsdp2",
                                                       teacher_dtype="bfloat16"), "bf16"), tmp_path)
    launch(LM_RECIPE, write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "fp32", 4, sharding="fsdp2"),
                                   "fp32"), tmp_path)
    bf16, fp32 = memory(tmp_path / "bf16"), memory(tmp_path / "fp32")
    assert bf16["teacher"] * 2 == fp32["teacher"] and bf16["weights"] == fp32["weights"]
    assert_close_weights(saved_weights(tmp_path / "bf16"), saved_weights(tmp_path / "fp32"), atol=1e-2)


def test_sharded_run_killed_mid_training_resumes_to_the_same_weights(lm_setup, tmp_path):
    teacher, corpus = lm_setup
    whole = write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "whole", 4, **SHARDED), "whole")
    launch(LM_RECIPE, whole, tmp_path)
    resumed = write_config(tmp_path, lm_values(tmp_path, teacher, corpus, "resumed", 4, **SHARDED), "resumed")
    script = tmp_path / "kill_at_step_4.py"
    script.write_text(KILL_AT)
    killed = launch(script, resumed, tmp_path, expect_ok=False)
    assert killed.returncode != 0
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["processes"] == 2
    assert (tmp_path / "resumed" / "checkpoint" / "sharded").is_dir()
    launch(LM_RECIPE, resumed, tmp_path)
    assert_close_weights(saved_weights(tmp_path / "resumed"), saved_weights(tmp_path / "whole"), atol=0.0)


def test_sharded_encoder_run_matches_one_process(sentiment_csv, tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def values(name, batch_size, **train):  # no dropout: the two launches draw their masks from different streams
        return {"teacher": str(teacher), "output_dir": str(tmp_path / name),
                "data": {"source": str(sentiment_csv), "text_column": "review", "label_column": "sentiment",
                         "max_length": 16},
                "student": {"layers": [1, 3]},
                "stages": [{"epochs": 1, "learning_rate": 1e-3,
                            "losses": [{"name": "kl", "temperature": 2.0}, {"name": "ce"}]}],
                "train": {"batch_size": batch_size, "eval_batch_size": 32, "max_steps_per_stage": 4,
                          "group_by_length": False, "select_best": False, **train}}
    encoder_job.distill(parse_args(DistillConfig, ["--config", str(write_config(tmp_path, values("one", 8), "one"))]))
    launch(ENCODER_RECIPE, write_config(tmp_path, values("fsdp", 4, **SHARDED), "fsdp"), tmp_path)
    assert_close_weights(saved_weights(tmp_path / "fsdp"), saved_weights(tmp_path / "one"))


def test_resuming_with_another_number_of_processes_is_refused(lm_setup, tmp_path):
    teacher, corpus = lm_setup
    cfg = lm_cfg(tmp_path, teacher, None)
    cfg.data = CorpusConfig(source=str(corpus), max_length=16)
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "processes": 2}))
    with pytest.raises(ConfigError, match="written by 2 processes; this launch has 1.*num_processes: 2"):
        distill_lm(cfg)


@pytest.mark.parametrize("train, extra, message", [
    ({"teacher_placement": "shard"}, {}, "teacher_placement: shard needs train.sharding: fsdp2"),
    ({"sharding": "zero3"}, {}, "train.sharding must be one of none, fsdp2"),
    ({"sharding": "fsdp2", "mixed_precision": "fp16"}, {}, "sharded gradient scaler; use bf16"),
    ({"sharding": "fsdp2"}, {"on_policy": OnPolicyConfig(lmbda=0.5)}, "on_policy with train.sharding: fsdp2"),
])
def test_sharding_settings_that_cannot_work_are_refused(lm_setup, tmp_path, train, extra, message):
    teacher, corpus = lm_setup
    cfg = lm_cfg(tmp_path, teacher, CorpusConfig(source=str(corpus), max_length=16), train=train_cfg(**train), **extra)
    with pytest.raises(ConfigError, match=message):
        distill_lm(cfg)
    assert not (tmp_path / "run").exists()


def test_a_sharded_run_of_several_stages_is_refused(sentiment_csv, tiny_teacher_dir, tmp_path):
    stage = StageConfig(epochs=1, learning_rate=1e-3, losses=[LossConfig(name="kl")])
    cfg = DistillConfig(teacher=str(tiny_teacher_dir), output_dir=str(tmp_path / "out"), data=data_cfg(sentiment_csv),
                        student=StudentConfig(layers=[1, 3]), stages=[stage, stage],
                        train=train_cfg(max_steps_per_stage=1, sharding="fsdp2"))
    with pytest.raises(ConfigError, match="fsdp2 trains one stage; this run has 2"):
        encoder_job.distill(cfg, on_step=never_train)


def test_sharding_in_a_single_process_is_refused(lm_setup, tmp_path):
    teacher, corpus = lm_setup
    cfg = lm_cfg(tmp_path, teacher, CorpusConfig(source=str(corpus), max_length=16),
                 train=train_cfg(sharding="fsdp2"))
    with pytest.raises(ConfigError, match="train.sharding: fsdp2 splits the student over the processes of a launch"):
        distill_lm(cfg, on_step=never_train)
