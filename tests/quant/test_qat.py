"""Quantization-aware distillation on a tiny fine-tuned teacher: the quantized student gets closer to the teacher,
only the adapters and the heads train, the adapters and the merged model reload with the outputs they had, a
killed run resumes to the same adapters, and requests that cannot work are refused by name."""
import json
import sys

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from distill.core.config import LossConfig, StageConfig
from distill.core.errors import ConfigError
from distill.core.models import load_classifier
from distill.encoder.config import FinetuneConfig
from distill.encoder.finetune import finetune
from distill.losses.hidden import hidden_mse
from quant.config import AdapterConfig, BnbConfig, QatConfig
from quant.qad.qlora import QuantizedBase, load_adapter, merge_adapter, qat_distill
from quant.schemes.bnb import accept_frozen_quantized_state, quantize_bnb
from tests.conftest import (
    FOUR_BIT_WIDTHS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    Interrupt,
    data_cfg,
    make_sentences,
    make_tokenizer,
    never_train,
    reset_accelerate,
    save_tiny_teacher,
    tiny_bert_config,
    train_cfg,
    write_sentiment_csv,
)

DISTIL = StageConfig(name="qlora", epochs=2, learning_rate=1e-3,
                     losses=[LossConfig(name="kl", temperature=2.0), LossConfig(name="hidden_mse")])
TEXTS = [text for text, _ in make_sentences(64, seed=7)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny fine-tuned teacher of conftest's `trained_teacher`, trained once for this module: its folder and
    the sentiment CSV."""
    tmp = tmp_path_factory.mktemp("qat")
    csv = write_sentiment_csv(tmp / "sentiment.csv")
    save_tiny_teacher(tmp / "init", **FOUR_BIT_WIDTHS)
    finetune(FinetuneConfig(model=str(tmp / "init"), output_dir=str(tmp / "teacher"), data=data_cfg(csv),
                            stage=StageConfig(epochs=10, learning_rate=3e-3, losses=[LossConfig(name="ce")]),
                            train=train_cfg()))
    reset_accelerate()
    return tmp / "teacher" / "model", csv


@pytest.fixture(scope="module")
def nf4_run(teacher, tmp_path_factory):
    """One NF4 run, shared by the tests that read its outputs."""
    model_dir, csv = teacher
    result = qat_distill(qat_cfg(model_dir, csv, tmp_path_factory.mktemp("nf4") / "run"))
    reset_accelerate()
    return result


def qat_cfg(teacher_dir, csv, out, **overrides) -> QatConfig:
    values = dict(teacher=str(teacher_dir), output_dir=str(out), data=data_cfg(csv), stages=[DISTIL],
                  lora=AdapterConfig(r=4, alpha=8), train=train_cfg())
    values.update(overrides)
    return QatConfig(**values)


def forward(model, tokenizer, **kwargs):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch, **kwargs), batch["attention_mask"]


def logits(model, tokenizer) -> torch.Tensor:
    return forward(model, tokenizer)[0].logits


def hidden_distance(model, teacher_model, tokenizer) -> float:
    """Hidden-state MSE to the teacher, averaged over the embedding output and every layer."""
    (student, mask), (reference, _) = (forward(m, tokenizer, output_hidden_states=True)
                                       for m in (model, teacher_model))
    pairs = zip(student.hidden_states, reference.hidden_states)
    return torch.stack([hidden_mse(s, t, mask) for s, t in pairs]).mean().item()


def test_distillation_brings_the_quantized_model_closer_to_the_teacher(nf4_run, teacher):
    # NF4 barely moves this teacher's logits (its pooler saturates: KL ~1e-7), so closeness is measured where the
    # quantization error shows and the distillation works: the hidden states.
    run_dir, tokenizer = nf4_run.run_dir, AutoTokenizer.from_pretrained(teacher[0])
    fp32 = load_classifier(str(teacher[0]))
    ptq = QuantizedBase.read(run_dir / "adapter").load()
    assert hidden_distance(nf4_run.model, fp32, tokenizer) < 0.5 * hidden_distance(ptq, fp32, tokenizer)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"fp32", "ptq", "qlora", "merged", "merged_requantized"}
    assert all(row["test_accuracy"] == 1.0 for row in metrics["models"].values())
    assert metrics["adapter_reload_equal"] and metrics["merged_reload_equal"]
    assert metrics["merged_max_abs_logit_difference_to_qlora"] < 1e-5
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "metrics.json", "adapter",
                                                  "model"}


def test_only_the_adapters_and_the_heads_train(nf4_run):
    adapter_dir = nf4_run.run_dir / "adapter"
    base = QuantizedBase.read(adapter_dir)
    assert base.variant == "bnb_nf4" and base.skip_modules == ["bert.pooler", "classifier"]
    trained = nf4_run.model
    fresh = PeftModel.from_pretrained(base.load(), str(adapter_dir))  # same modules, base as quantized
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or ".modules_to_save." in name for name in trainable)
    assert sum(".modules_to_save." in name for name in trainable) == 4  # pooler and classifier, weight and bias
    state, fresh_state = trained.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys()
    frozen = [key for key in state if key not in trainable]
    assert any("base_layer.weight.quant_state" in key for key in frozen)
    for key in frozen:
        assert torch.equal(state[key], fresh_state[key]), key
    query = trained.get_base_model().bert.encoder.layer[0].attention.self.query
    assert query.lora_B["default"].weight.abs().sum() > 0  # initialised at zero, then trained
    classifier = trained.get_base_model().classifier
    assert not torch.equal(classifier.modules_to_save["default"].weight, classifier.original_module.weight)


def test_adapter_and_merged_model_reload_with_their_outputs(nf4_run, teacher):
    run_dir, tokenizer = nf4_run.run_dir, AutoTokenizer.from_pretrained(teacher[0])
    expected = logits(nf4_run.model, tokenizer)
    assert torch.equal(logits(load_adapter(run_dir / "adapter"), tokenizer), expected)

    merged = merge_adapter(run_dir / "adapter")
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert type(reloaded) is BertForSequenceClassification
    assert torch.equal(logits(reloaded, tokenizer), logits(merged, tokenizer))
    assert torch.equal(logits(load_classifier(str(run_dir / "model")), tokenizer), logits(merged, tokenizer))
    # merged into the dequantized weights, it computes what the 4-bit model did, up to fp32 rounding
    assert torch.allclose(logits(merged, tokenizer), expected, rtol=0, atol=1e-5)
    # merged into the original fp32 weights, it does not: the adapters learnt a correction of the 4-bit weights
    original = logits(merge_adapter(run_dir / "adapter", into="original"), tokenizer)
    assert (original - expected).abs().max() > 1e-4


def test_int8_base_trains_and_reloads(teacher, tmp_path):
    model_dir, csv = teacher
    stage = StageConfig(name="qlora", epochs=1, learning_rate=1e-3, losses=DISTIL.losses)
    result = qat_distill(qat_cfg(model_dir, csv, tmp_path / "int8", bits=8, stages=[stage], merge_into="original"))
    metrics = result.metrics
    assert metrics["variant"] == "bnb_int8"
    assert metrics["adapter_reload_equal"] and metrics["merged_reload_equal"]
    query = result.model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert type(query.base_layer).__name__ == "Linear8bitLt"
    assert query.lora_B["default"].weight.abs().sum() > 0


def test_killed_run_resumes_to_the_same_adapters(teacher, tmp_path):
    model_dir, csv = teacher
    stage = StageConfig(name="qlora", epochs=1, learning_rate=1e-3, losses=DISTIL.losses)
    full = qat_distill(qat_cfg(model_dir, csv, tmp_path / "full", stages=[stage], merge=False)).model
    reset_accelerate()
    calls = []

    def kill(state):
        calls.append(state.global_step)
        if len(calls) == 5:  # after the checkpoint of step 3 (train_cfg saves every 3 steps)
            raise Interrupt

    cfg = qat_cfg(model_dir, csv, tmp_path / "resumed", stages=[stage], merge=False)
    with pytest.raises(Interrupt):
        qat_distill(cfg, on_step=kill)
    assert (tmp_path / "resumed" / "checkpoint" / "model.safetensors").is_file()
    reset_accelerate()
    steps = []
    resumed = qat_distill(cfg, on_step=lambda state: steps.append(state.global_step)).model
    assert steps == [4, 5, 6, 7, 8, 9]  # from the checkpoint, with the 4-bit base loaded back into the model
    trained = [name for name, p in full.named_parameters() if p.requires_grad]
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    for name in trained:
        assert torch.equal(full_state[name], resumed_state[name]), name


def test_a_4bit_state_dict_of_another_base_is_refused(four_bit_teacher_dir, tmp_path):
    torch.manual_seed(1)
    other = BertForSequenceClassification(tiny_bert_config(len(make_tokenizer(POSITIVE + NEGATIVE + NEUTRAL)),
                                                           **FOUR_BIT_WIDTHS))
    other.save_pretrained(tmp_path / "other")
    model = quantize_bnb(str(four_bit_teacher_dir), "bnb_nf4", BnbConfig())
    accept_frozen_quantized_state(model)
    model.load_state_dict(model.state_dict())  # its own state loads back
    with pytest.raises(RuntimeError, match="query.weight.absmax differs from the frozen quantized weights"):
        model.load_state_dict(quantize_bnb(str(tmp_path / "other"), "bnb_nf4", BnbConfig()).state_dict())


@pytest.mark.parametrize("targets, message", [
    (["classifier"], "asks for 4-bit training of classifier, which stays in full precision"),
    (["word_embeddings"], "bert.embeddings.word_embeddings, a module of type Embedding, which bitsandbytes cannot"),
    (["attention.self"], "a module of type BertSelfAttention"),
    (["qurey"], "entry 'qurey' matches no module"),
    ([], "lora.target_modules is empty"),
])
def test_training_a_module_that_is_not_quantized_is_refused(targets, message, four_bit_teacher_dir, sentiment_csv,
                                                             tmp_path):
    cfg = qat_cfg(four_bit_teacher_dir, sentiment_csv, tmp_path / "bad", lora=AdapterConfig(target_modules=targets))
    with pytest.raises(ConfigError, match=message):
        qat_distill(cfg, on_step=never_train)


@pytest.mark.parametrize("overrides, message", [
    (dict(bits=3), "bits must be 4 or 8; got 3"),
    (dict(quant_type="int4"), "quant_type must be one of nf4, fp4"),
    (dict(merge_into="fp32"), "merge_into must be one of dequantized, original"),
    (dict(lora=AdapterConfig(r=0)), "lora.r must be at least 1"),
    (dict(stages=[]), "at least one stage"),
])
def test_bad_settings_are_refused_before_any_work(overrides, message, tmp_path):
    cfg = qat_cfg(tmp_path / "missing", tmp_path / "missing.csv", tmp_path / "bad", **overrides)
    with pytest.raises(ConfigError, match=message):
        qat_distill(cfg, on_step=never_train)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("package, message", [("peft", r'pip install "peft>=0.15"'),
                                              ("bitsandbytes", r'pip install "bitsandbytes>=0.45"')])
def test_missing_packages_name_the_install_command(package, message, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ConfigError, match=message):
        qat_distill(qat_cfg(tmp_path / "teacher", tmp_path / "data.csv", tmp_path / "out"), on_step=never_train)


def test_an_unsupported_architecture_is_named(tiny_teacher_dir, sentiment_csv, tmp_path):
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, num_labels=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    cfg = qat_cfg(tiny_teacher_dir, sentiment_csv, tmp_path / "bad", student=str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported for quantization"):
        qat_distill(cfg, on_step=never_train)
