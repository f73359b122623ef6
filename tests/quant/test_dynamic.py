"""Dynamic int8 and half precision (`quant.schemes.dynamic`) on a tiny BERT: the note in the config selects the Linears,
the task heads stay in fp32, outputs stay close to fp32 without equalling them, a saved checkpoint reloads quantized to
the same outputs, and requests that cannot work are refused."""
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from distill.core.errors import ConfigError
from quant.schemes.dynamic import load_dynamic_int8, load_half, mark_dynamic_int8, quantize_dynamic_int8
from quant.schemes.loading import load_pretrained
from tests.conftest import make_tokenizer, save_tiny_teacher

IDS = torch.randint(5, 20, (4, 10), generator=torch.Generator().manual_seed(0))


def close(a, b) -> bool:
    """Within 5% of the reference's largest logit."""
    return (a.float() - b).abs().max() < 0.05 * b.abs().max()


def logits(model):
    with torch.inference_mode():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.fixture
def folder(tmp_path):
    """A tiny BERT whose weights are wide enough that int8 rounding shows in its logits."""
    return str(save_tiny_teacher(tmp_path / "bert", initializer_range=0.1))


def test_encoder_linears_become_int8_the_heads_stay_and_outputs_stay_close(folder):
    reference = logits(load_pretrained(folder))
    model = load_pretrained(folder)
    mark_dynamic_int8(model)
    assert model.config.quantization == {"method": "dynamic_int8", "skip_modules": ["bert.pooler", "classifier"]}
    quantize_dynamic_int8(model)
    layer = model.bert.encoder.layer[0]
    assert type(layer.attention.self.query) is DynamicLinear and type(layer.output.dense) is DynamicLinear
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    quantized = logits(model)
    assert not torch.equal(quantized, reference)
    assert close(quantized, reference)


def test_a_saved_checkpoint_reloads_quantized_to_the_same_outputs(folder, tmp_path):
    model = load_pretrained(folder)
    mark_dynamic_int8(model, ["classifier"])  # the pooler is quantized too
    model.save_pretrained(tmp_path / "int8")
    make_tokenizer([]).save_pretrained(tmp_path / "int8")
    expected = logits(quantize_dynamic_int8(model))
    reloaded = load_dynamic_int8(str(tmp_path / "int8"))
    assert type(reloaded.bert.pooler.dense) is DynamicLinear and type(reloaded.classifier) is nn.Linear
    assert torch.equal(logits(reloaded), expected)


def test_half_precision_loads_in_the_dtype(folder):
    model = load_half(folder, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert close(logits(model), logits(load_pretrained(folder)))
    with pytest.raises(ConfigError, match="'int4' is not a half-precision variant"):
        load_half(folder, "int4")


def test_quantizing_without_the_note_or_with_nothing_left_is_refused(folder):
    model = load_pretrained(folder)
    with pytest.raises(ConfigError, match="no dynamic_int8 note"):
        quantize_dynamic_int8(model)
    model.config.quantization = {"method": "dynamic_int8", "skip_modules": ["bert", "classifier"]}
    with pytest.raises(ConfigError, match="leave no Linear to quantize"):
        quantize_dynamic_int8(model)
