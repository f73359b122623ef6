"""The compressed-tensors variants (llm-compressor) on tiny random models: GPTQ W4A16 saves a folder that plain
`from_pretrained` reloads to the in-memory model's logits, with every quantized weight on a 4-bit grid (at most 16
values per group) and the LM head untouched; GPTQ's output error on inputs like its calibration text is well below
round-to-nearest's in the same format; the LM quantization job measures these variants from the reloaded folders;
a bad group size, too little calibration text and a missing package are refused in one line before any work."""
import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from distill.core.config import CalibrationConfig, CorpusConfig
from distill.core.errors import ConfigError
from distill.core.models import load_tokenizer
from distill.lm.data import evaluation_texts
from quant.config import LMQuantConfig, WeightSchemeConfig
from quant.quantize_lm import check_lm_quant, quantize_lm, text_perplexity
from quant.schemes.variants import build_variant
from tests.conftest import make_tokenizer
from tests.helpers.families import HIDDEN, LAYERS, tiny_family_model
from tests.helpers.lm_models import cycle_lines
from tests.helpers.lm_runs import WORDS

GROUP = 48
"""Divides every input width of the tiny families (48 and 96), and leaves a group room for more than 16 values."""
CALIBRATION_IDS = (3, 20)
"""Calibration and probe texts draw their tokens from this range only: inputs in a subspace, as real text's are."""


def token_texts(count: int, seed: int) -> list[list[int]]:
    return torch.randint(*CALIBRATION_IDS, (count, 16), generator=torch.Generator().manual_seed(seed)).tolist()


def save_family(folder, family):
    tiny_family_model(family).save_pretrained(folder)
    make_tokenizer(WORDS).save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def logits(model, texts) -> torch.Tensor:
    return model(torch.tensor(texts)).logits


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gptq(request, tmp_path_factory):
    """A tiny model of the family, its GPTQ W4A16 folder and the in-memory quantized model's logits on probe texts."""
    root = tmp_path_factory.mktemp(request.param)
    source = save_family(root / "fp32", request.param)
    model = build_variant(source, "gptq_w4a16", make_tokenizer(WORDS), root / "gptq", scheme=WeightSchemeConfig(GROUP),
                          calibration=token_texts(32, seed=0))
    probe = token_texts(4, seed=1)
    return source, root / "gptq", probe, logits(model, probe)


def test_gptq_folder_reloads_with_plain_from_pretrained_to_the_same_logits(gptq):
    source, folder, probe, expected = gptq
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == GROUP and config["ignore"] == ["lm_head"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(reloaded, probe), expected)
    assert not torch.equal(expected, logits(AutoModelForCausalLM.from_pretrained(source).eval(), probe))


def test_gptq_weights_sit_on_a_4bit_grid(gptq):
    """Dequantized on loading, each group of a quantized weight holds at most 16 values (in fp32: all different)."""
    source, folder, _, _ = gptq
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    dequantize = CompressedTensorsConfig(dequantize=True)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=dequantize)
    quantized = {name: module.weight for name, module in reloaded.named_modules()
                 if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    assert len(quantized) == 7 * LAYERS  # q, k, v, o, gate, up and down in each layer
    for name, weight in quantized.items():
        groups = weight.reshape(-1, GROUP)
        assert max(len(group.unique()) for group in groups) <= 16, name
        assert max(len(group.unique()) for group in original.get_submodule(name).weight.reshape(-1, GROUP)) == GROUP
    assert torch.equal(reloaded.lm_head.weight, original.lm_head.weight.to(torch.bfloat16))


def test_gptq_folder_keeps_every_other_tensor_in_bf16_as_vllm_runs_it(gptq):
    """Packed int4 weights, and in bf16 their scales, the embedding, the norms and the LM head: no float32 tensor
    doubling the disk."""
    _, folder, _, _ = gptq
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        dtypes = {name: tensors.get_slice(name).get_dtype() for name in tensors.keys()}
    assert {dtypes[name] for name in dtypes if name.endswith("weight_packed")} == {"I32"}
    floats = {name: dtype for name, dtype in dtypes.items() if not name.endswith(("weight_packed", "weight_shape"))}
    assert set(floats.values()) == {"BF16"} and "lm_head.weight" in floats and any("weight_scale" in n for n in floats)


def test_gptq_uses_its_calibration(tmp_path):
    """On texts drawn like the calibration text, GPTQ's logits are much closer to the fp32 model's than round-to-
    nearest's, the same 4-bit format without calibration."""
    source = save_family(tmp_path / "fp32", "llama")
    probe = token_texts(8, seed=1)
    reference = logits(AutoModelForCausalLM.from_pretrained(source).eval(), probe)
    error = {}
    for variant in ("rtn_w4a16", "gptq_w4a16"):
        model = build_variant(source, variant, make_tokenizer(WORDS), tmp_path / variant,
                              scheme=WeightSchemeConfig(GROUP), calibration=token_texts(32, seed=0))
        error[variant] = (logits(model, probe) - reference).pow(2).mean().item()
    assert error["gptq_w4a16"] < 0.5 * error["rtn_w4a16"], error


@pytest.fixture
def lm_corpus(tmp_path):
    """A tiny random Llama with a tokenizer of its words, and a corpus of 40 lines of them."""
    (tmp_path / "corpus.txt").write_text("\n".join(cycle_lines(WORDS, 40, seed=2)) + "\n")
    return save_family(tmp_path / "lm", "llama"), CorpusConfig(source=str(tmp_path / "corpus.txt"), max_length=16)


def job_config(tmp_path, source, data, variants, **overrides) -> LMQuantConfig:
    return LMQuantConfig(model=source, output_dir=str(tmp_path / "quant"), variants=variants, data=data,
                         validation_examples=5, test_examples=6, eval_examples=4,
                         scheme=WeightSchemeConfig(GROUP), calibration=CalibrationConfig(examples=20), **overrides)


def test_job_measures_compressed_variants_from_their_reloaded_folders(tmp_path, lm_corpus):
    source, data = lm_corpus
    cfg = job_config(tmp_path, source, data, ["fp32", "rtn_w4a16", "gptq_w4a16", "w8a8_int8"])
    rows = quantize_lm(cfg).metrics["variants"]
    texts = evaluation_texts(cfg, load_tokenizer(source))["test"]
    for name in ("rtn_w4a16", "gptq_w4a16", "w8a8_int8"):
        assert rows[name]["reload_equal"]
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "quant" / name).eval()
        assert rows[name]["test_perplexity"] == pytest.approx(text_perplexity(plain, texts), rel=1e-9)
        assert 0 < rows[name]["kld_mean"] and rows[name]["same_top1"] <= 1
    assert rows["fp32"]["kld_mean"] == pytest.approx(0, abs=1e-12) and rows["fp32"]["same_top1"] == 1
    assert rows["w8a8_int8"]["kld_mean"] < rows["rtn_w4a16"]["kld_mean"]
    assert "| gptq_w4a16 |" in (tmp_path / "quant" / "report.md").read_text()


@pytest.mark.parametrize("overrides, message", [
    ({"scheme": WeightSchemeConfig(32)},
     f"scheme.group_size 32 does not divide the {HIDDEN} input features of model.layers.0.self_attn.q_proj; 16 does"),
    ({"calibration": CalibrationConfig(examples=1)}, "gptq_w4a16 needs at least 96 calibration tokens"),
    ({"scheme": WeightSchemeConfig(GROUP, dtype="int8")}, "scheme.dtype must be one of bf16, fp16, fp32; got 'int8'"),
])
def test_bad_scheme_and_too_little_calibration_are_refused_before_work(tmp_path, lm_corpus, overrides, message):
    source, data = lm_corpus
    cfg = job_config(tmp_path, source, data, ["fp32", "gptq_w4a16"])
    for name, value in overrides.items():
        setattr(cfg, name, value)
    with pytest.raises(ConfigError, match=message):
        quantize_lm(cfg)
    assert not (tmp_path / "quant").exists()


def test_missing_llmcompressor_is_refused_in_one_line(tmp_path, lm_corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    source, data = lm_corpus
    with pytest.raises(ConfigError, match="need the llmcompressor package: bash scripts/setup.sh"):
        check_lm_quant(job_config(tmp_path, source, data, ["gptq_w4a16"]))
