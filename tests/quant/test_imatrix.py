"""The importance matrix (`quant.export.imatrix`): the mean squared input of each weight column, computed apart from
the hooks it is collected by; a GGUF name for every weight of every family the exporter accepts; and the export that
weighs llama.cpp's quantizer by it."""
import json

import pytest
import torch
from torch import nn

from distill.core.config import CalibrationConfig, CorpusConfig
from distill.core.errors import ConfigError
from distill.core.fingerprint import file_sha256
from quant.config import GgufConfig
from quant.export.gguf import GGUF_FAMILIES, IMATRIX_TOKENS, export_gguf
from quant.export.imatrix import activation_importance, gguf_named
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus
from tests.helpers.families import tiny_family_model

TEXTS = [[5, 9, 14, 3, 22, 7], [8, 8, 31, 2]]


def test_the_importance_is_each_columns_mean_squared_input():
    model = tiny_family_model("llama")
    importance, tokens = activation_importance(model, TEXTS)
    assert tokens == 10
    layer = model.model.layers[0]
    with torch.no_grad():  # the first layer's attention input, by hand: its norm of the embeddings
        inputs = torch.cat([layer.input_layernorm(model.model.embed_tokens(torch.tensor(ids))) for ids in TEXTS])
    expected = (inputs.double() ** 2).mean(0).float().numpy()
    for name in ("q_proj", "k_proj", "v_proj"):
        assert importance[f"model.layers.0.self_attn.{name}.weight"] == pytest.approx(expected, rel=1e-5)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert len(importance) == len(linears) - 1 and "lm_head.weight" not in importance  # the head is left out


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_weight_of_each_family_gets_its_gguf_name(family):
    model = tiny_family_model(family)
    importance, _ = activation_importance(model, TEXTS[:1])
    named = gguf_named(importance, model.config.model_type, model.config.num_hidden_layers)
    assert len(named) == len(importance)
    layer_zero = sorted(name for name in named if name.startswith("blk.0."))
    fused = family == "phi3"  # one qkv and one gate+up matrix
    expected = (["blk.0.attn_output.weight", "blk.0.attn_qkv.weight"] if fused else
                ["blk.0.attn_k.weight", "blk.0.attn_output.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight"])
    expected += ["blk.0.ffn_down.weight", "blk.0.ffn_up.weight"] + ([] if fused else ["blk.0.ffn_gate.weight"])
    assert layer_zero == sorted(expected)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A 2-layer Llama 256 wide (k-quant rows are 256 long) and a corpus whose training part holds 1,000+ tokens."""
    pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")
    root = tmp_path_factory.mktemp("imatrix")
    save_smollm2_tokenizer_lm(root / "lm", hidden_size=256, intermediate_size=512, initializer_range=0.2)
    write_review_corpus(root / "corpus.txt", 80)
    return root


def export_cfg(root, out, **overrides) -> GgufConfig:
    values = dict(model=str(root / "lm"), output_dir=str(root / out), types=["f16", "q2_k"],
                  data=CorpusConfig(source=str(root / "corpus.txt"), max_length=32), validation_examples=5,
                  test_examples=10, eval_examples=4, prompts=["The acting"], max_new_tokens=4,
                  calibration=CalibrationConfig(examples=60))
    return GgufConfig(**{**values, **overrides})


def test_the_quantizer_is_weighed_by_the_matrix(root):
    weighed = export_gguf(export_cfg(root, "with")).metrics
    plain = export_gguf(export_cfg(root, "without", calibration=None)).metrics
    assert weighed["imatrix"]["tensors"] == 14 and weighed["imatrix"]["tokens"] >= IMATRIX_TOKENS
    assert weighed["types"]["q2_k"]["imatrix"] and not weighed["types"]["f16"]["imatrix"]
    assert plain["imatrix"] is None and not plain["types"]["q2_k"]["imatrix"]
    assert file_sha256(root / "with" / "model-f16.gguf") == file_sha256(root / "without" / "model-f16.gguf")
    assert file_sha256(root / "with" / "model-q2_k.gguf") != file_sha256(root / "without" / "model-q2_k.gguf")
    assert json.loads((root / "with" / "metrics.json").read_text())["imatrix"] == weighed["imatrix"]


def test_too_little_calibration_text_is_refused_before_the_model_loads(root):
    with pytest.raises(ConfigError, match=r"calibration has \d+ tokens \(3 texts of at most 32\); an importance "
                                          r"matrix needs at least 512"):
        export_gguf(export_cfg(root, "few", calibration=CalibrationConfig(examples=3)))
    assert not (root / "few").exists()
