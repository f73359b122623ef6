"""Post-training quantization on tiny random models: every variant saves and reloads with the outputs it had in
memory (stock BERT and Llama, and a pruned checkpoint with remote code), the task heads stay in full precision,
4-bit layers stay out of bitsandbytes' CPU repacking, and bad requests are refused with a clear message."""
import sys

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from distill.core.errors import ConfigError
from prune.embeddings import compress_word_embedding
from prune.heads import prune_heads
from prune.lowrank import factorize
from prune.saving import save_compressed
from quant.config import BnbConfig
from quant.schemes.bnb import keep_out_of_cpu_repacking, load_bnb, quantize_bnb
from quant.schemes.compressed import COMPRESSED_VARIANTS
from quant.schemes.loading import empty_model, skip_patterns
from quant.schemes.variants import VARIANTS, build_variant, check_variants, load_variant
from tests.conftest import FOUR_BIT_WIDTHS, make_tokenizer, tiny_bert_config, tiny_causal_lm

TOKENIZER = make_tokenizer(["good", "bad", "film", "plot"])
INPUTS = torch.randint(5, len(TOKENIZER), (3, 9), generator=torch.Generator().manual_seed(1))


def outputs(model):
    with torch.inference_mode():
        return model(input_ids=INPUTS, attention_mask=torch.ones_like(INPUTS)).logits


def saved(model, folder):
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def bert_dir(four_bit_teacher_dir):
    return str(four_bit_teacher_dir)


@pytest.mark.parametrize("variant", [name for name in VARIANTS if name not in COMPRESSED_VARIANTS])
def test_every_variant_reloads_with_the_outputs_it_had_in_memory(variant, bert_dir, tmp_path):
    """(The compressed-tensors variants, calibrated on causal-LM text, are tested in test_compressed.py.)"""
    model = build_variant(bert_dir, variant, TOKENIZER, tmp_path / variant)
    expected = outputs(model)
    reloaded = load_variant(tmp_path / variant)
    assert torch.equal(outputs(reloaded), expected)
    assert type(reloaded.classifier) is nn.Linear and type(reloaded.bert.pooler.dense) is nn.Linear
    query = reloaded.bert.encoder.layer[0].attention.self.query
    kinds = {"fp32": nn.Linear, "bf16": nn.Linear, "fp16": nn.Linear, "bnb_int8": bnb.nn.Linear8bitLt,
             "bnb_nf4": bnb.nn.Linear4bit, "bnb_fp4": bnb.nn.Linear4bit,
             "dynamic_int8": torch.ao.nn.quantized.dynamic.Linear}
    assert type(query) is kinds[variant]


@pytest.mark.parametrize("variant", ["bf16", "dynamic_int8", "bnb_int8", "bnb_nf4"])
def test_decoder_variants_reload_equal_and_keep_the_tied_lm_head(variant, tmp_path):
    source = saved(tiny_causal_lm(len(TOKENIZER), tied=True, **FOUR_BIT_WIDTHS), tmp_path / "llama")
    model = build_variant(source, variant, TOKENIZER, tmp_path / variant)
    expected = outputs(model)
    reloaded = load_variant(tmp_path / variant)
    assert torch.equal(outputs(reloaded), expected)
    assert type(reloaded.lm_head) is nn.Linear
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def save_pruned_bert(folder):
    torch.manual_seed(0)
    pruned = BertForSequenceClassification(tiny_bert_config(len(TOKENIZER))).eval()
    prune_heads(pruned, {0: [0, 2], 2: [1]})
    factorize(pruned, rank=4)
    compress_word_embedding(pruned, int8=True)
    save_compressed(pruned, TOKENIZER, folder)


@pytest.mark.parametrize("variant", ["dynamic_int8", "bnb_int8"])
def test_a_pruned_checkpoint_with_remote_code_quantizes_and_reloads(variant, tmp_path):
    save_pruned_bert(tmp_path / "pruned")
    model = build_variant(str(tmp_path / "pruned"), variant, TOKENIZER, tmp_path / variant)
    expected = outputs(model)
    assert (tmp_path / variant / "modeling_compressed.py").is_file()
    reloaded = load_variant(tmp_path / variant)
    assert type(reloaded).__name__ == "CompressedBertForSequenceClassification"
    assert torch.equal(outputs(reloaded), expected)


def test_4bit_variants_refuse_rows_that_are_not_whole_blocks_on_the_cpu(tmp_path):
    """bitsandbytes' CPU 4-bit kernels miscompute such rows: 32-value rows come back with about 40% relative error."""
    def roundtrip_error(columns: int) -> float:
        rows = torch.randn(100, columns, generator=torch.Generator().manual_seed(0))
        packed, state = bnb.functional.quantize_4bit(rows, blocksize=64, quant_type="nf4")
        return ((bnb.functional.dequantize_4bit(packed, state) - rows).norm() / rows.norm()).item()

    assert roundtrip_error(32) > 1.5 * roundtrip_error(64)  # the kernel's fault this check guards against
    save_pruned_bert(tmp_path / "pruned")
    with pytest.raises(ConfigError, match="bitsandbytes' CPU 4-bit kernels miscompute rows whose length is not a "
                                          "multiple of 64: bert.encoder.layer.0.attention.self.query.0 has 32 inputs"):
        build_variant(str(tmp_path / "pruned"), "bnb_nf4", TOKENIZER, tmp_path / "nf4")


def test_4bit_layers_stay_out_of_cpu_repacking_so_saving_after_inference_works(bert_dir, tmp_path, monkeypatch):
    # as on a CPU with avx512_bf16, where a Linear4bit would repack its weight at the first eval forward pass
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(4, 4).support_avx512bf16_for_cpu
    model = quantize_bnb(bert_dir, "bnb_nf4", BnbConfig())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    expected = outputs(model)  # the inference pass before saving
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.save_pretrained(tmp_path / "nf4")
    reloaded = load_bnb(str(tmp_path / "nf4"))
    assert not any(m.support_avx512bf16_for_cpu for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert torch.equal(outputs(reloaded), expected)
    keep_out_of_cpu_repacking(reloaded)  # idempotent


def test_default_skips_are_the_heads_of_each_architecture(bert_dir, tmp_path):
    assert sorted(skip_patterns(empty_model(bert_dir))) == ["bert.pooler", "classifier"]
    roberta_config = RobertaConfig(**tiny_bert_config(len(TOKENIZER)).to_dict() | {"model_type": "roberta",
                                                                                     "pad_token_id": 0})
    roberta = saved(RobertaForSequenceClassification(roberta_config), tmp_path / "roberta")
    assert skip_patterns(empty_model(roberta)) == ["classifier"]
    llama = saved(tiny_causal_lm(len(TOKENIZER), tied=False), tmp_path / "llama")
    assert skip_patterns(empty_model(llama)) == ["lm_head"]
    llama_config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=48, num_labels=2, pad_token_id=0)
    scorer = saved(LlamaForSequenceClassification(llama_config), tmp_path / "scorer")
    assert skip_patterns(empty_model(scorer)) == ["score"]


def test_skip_modules_can_be_overridden(bert_dir, tmp_path):
    model = build_variant(bert_dir, "bnb_nf4", TOKENIZER, tmp_path / "nf4", skip_modules=["classifier"])
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is bnb.nn.Linear4bit
    everything = build_variant(bert_dir, "dynamic_int8", TOKENIZER, tmp_path / "dyn", skip_modules=[])
    assert type(everything.classifier) is torch.ao.nn.quantized.dynamic.Linear
    assert torch.equal(outputs(load_variant(tmp_path / "dyn")), outputs(everything))
    with pytest.raises(ConfigError, match="skip_modules entry 'clasifier' matches no module"):
        build_variant(bert_dir, "bnb_int8", TOKENIZER, tmp_path / "x", skip_modules=["clasifier"])
    with pytest.raises(ConfigError, match="leave no Linear"):
        build_variant(bert_dir, "dynamic_int8", TOKENIZER, tmp_path / "y", skip_modules=["bert", "classifier"])


def test_missing_bitsandbytes_names_the_install_command(bert_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match=r'pip install "bitsandbytes>=0.45"'):
        quantize_bnb(bert_dir, "bnb_nf4", BnbConfig())
    with pytest.raises(ConfigError, match="bitsandbytes"):
        check_variants(["fp32", "bnb_int8"], BnbConfig())
    check_variants(["fp32", "dynamic_int8", "bf16"], BnbConfig())  # fine without it


def test_an_unsupported_architecture_is_named(tmp_path):
    gpt2 = saved(GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(TOKENIZER))),
                 tmp_path / "gpt2")
    for variant in ("bnb_nf4", "dynamic_int8"):
        with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported for quantization"):
            build_variant(gpt2, variant, TOKENIZER, tmp_path / variant)


@pytest.mark.parametrize("variants, message", [
    (["nf4"], "unknown variant 'nf4'; did you mean 'bnb_nf4'"),
    (["int4"], "unknown variant 'int4'"),
    (["fp32", "fp32"], "lists a name twice"),
    ([], "lists nothing"),
])
def test_invalid_variant_names_are_refused(variants, message):
    with pytest.raises(ConfigError, match=message):
        check_variants(variants, BnbConfig())


@pytest.mark.parametrize("settings, message", [
    (BnbConfig(compute_dtype="fp8"), "bnb.compute_dtype must be one of float32, bfloat16, float16; got 'fp8'"),
    (BnbConfig(int8_threshold=-1.0), "bnb.int8_threshold must be 0"),
])
def test_invalid_bnb_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_variants(["bnb_nf4"], settings)


def test_bnb_settings_reach_the_saved_config(bert_dir, tmp_path):
    settings = BnbConfig(double_quant=False, compute_dtype="bfloat16")
    model = build_variant(bert_dir, "bnb_fp4", TOKENIZER, tmp_path / "fp4", settings)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.weight.quant_state.quant_type == "fp4" and layer.weight.quant_state.state2 is None
    assert layer.compute_dtype is torch.bfloat16
    expected = outputs(model)
    reloaded = load_variant(tmp_path / "fp4")
    assert reloaded.config.quantization_config.bnb_4bit_compute_dtype is torch.bfloat16
    assert torch.equal(outputs(reloaded), expected)
    int8 = build_variant(bert_dir, "bnb_int8", TOKENIZER, tmp_path / "int8", BnbConfig(int8_threshold=0.0))
    assert int8.bert.encoder.layer[0].attention.self.query.state.threshold == 0.0
