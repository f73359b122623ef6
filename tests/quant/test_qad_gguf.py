"""Quantization-aware distillation on llama.cpp's grid. The projection (llama.cpp's quantizer, then the gguf
package's dequantizer) equals, tensor for tensor, what llama.cpp writes into a GGUF file of q4_0, q4_k_m and q2_k (so
Q4_0, Q4_K, Q6_K, Q2_K and Q3_K blocks). A few self-QAD steps on a tiny Llama and a tiny Qwen3 (rows 256 wide, so
the k-quants are not replaced by their fallbacks), exported by export_gguf with the same type: llama.cpp's logits
match the fake-quantized model's, and not the latent model's. A killed QAD run resumes to the same weights. What
cannot be trained is refused before any work."""
import json

import numpy as np
import pytest
import torch

from distill.core.config import CorpusConfig, LossConfig, StageConfig, StudentConfig, TrainConfig
from distill.core.errors import ConfigError
from distill.core.models import load_causal_lm, load_tokenizer
from distill.lm.config import LMDistillConfig, LMEvalConfig, QADConfig
from distill.lm.job import check_lm_distill, distill_lm
from quant.config import GgufConfig
from quant.export.gguf import export_gguf, gguf_logits, loaded, write_files
from quant.qad.gguf import fake_quantize
from quant.schemes.gguf_grid import gguf_package, project
from tests.conftest import Interrupt, assert_same_weights, save_smollm2_tokenizer_lm, train_cfg, write_review_corpus

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")

TEXTS = ["review 3: the film was good and the acting was fine", "the plot less so, review 7: the film"]
GRID_TOLERANCE = 0.2
"""llama.cpp's logits differ from the fake-quantized model's by at most this share of how far they are from the
latent model's (mean |logit difference|): llama.cpp also rounds the activations (to 8 bits, in its k-quant dot
products), which PyTorch does not. Measured: 0.05 (Llama, Q2_K), 0.13 (Qwen3, Q4_K_M, whose weights move less)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qad")
    write_review_corpus(folder / "corpus.txt", 40)
    return folder


def tiny_lm(root, family="llama"):
    folder = root / family
    if not folder.exists():
        save_smollm2_tokenizer_lm(folder, family, hidden_size=256, intermediate_size=512, initializer_range=0.2)
    return folder


def corpus(root):
    return CorpusConfig(source=str(root / "corpus.txt"), max_length=32)


def qad_cfg(root, model, name, gguf_type="q2_k", **overrides) -> LMDistillConfig:
    values = dict(teacher=str(model), output_dir=str(root / name), data=corpus(root), validation_examples=5,
                  test_examples=5, student=StudentConfig(init="pretrained", model=str(model)),
                  qad=QADConfig(type=gguf_type), stages=[StageConfig(epochs=1, learning_rate=1e-3,
                                                                     losses=[LossConfig(name="forward_kl")])],
                  eval=LMEvalConfig(prompts=["the film"], max_new_tokens=4),
                  train=train_cfg(batch_size=8, eval_batch_size=8, max_steps_per_stage=4, save_steps=2))
    values.update(overrides)
    return LMDistillConfig(**values)


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_k_m", "q2_k"])
def test_the_projection_is_what_llama_cpp_writes_into_the_file(root, gguf_type):
    gguf = gguf_package()
    model = tiny_lm(root)
    (root / gguf_type).mkdir()
    files = write_files(GgufConfig(types=["f16", gguf_type]), model, root / gguf_type, 1)
    source = {tensor.name: tensor for tensor in gguf.GGUFReader(files["f16"]).tensors}
    seen = set()
    for tensor in gguf.GGUFReader(files[gguf_type]).tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        f16 = source[tensor.name]
        weight = gguf.quants.dequantize(f16.data, f16.tensor_type).reshape(-1, int(tensor.shape[0]))
        written = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.array_equal(project(weight, int(tensor.tensor_type), threads=2), written), tensor.name
        seen.add(tensor.tensor_type.name)
    expected = {"q4_0": {"Q4_0"}, "q4_k_m": {"Q4_K", "Q6_K"}, "q2_k": {"Q2_K", "Q3_K"}}[gguf_type]
    assert expected <= seen


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def grid_distances(root, run, gguf_type) -> tuple[float, float]:
    """Mean |logit difference| of llama.cpp running the export of `run`'s model from the fake-quantized model and
    from the latent model, over TEXTS."""
    cfg = GgufConfig(model=str(run / "model"), output_dir=str(run.with_name(run.name + "-gguf")), types=[gguf_type],
                     data=corpus(root), validation_examples=5, test_examples=5, eval_examples=2,
                     prompts=["the film"], max_new_tokens=4)
    export_gguf(cfg)
    model, tokenizer = load_causal_lm(cfg.model).eval(), load_tokenizer(cfg.model)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    latent = [logits(model, text) for text in ids]
    fake_quantize(model, tokenizer, QADConfig(type=gguf_type), root)
    fake = [logits(model, text) for text in ids]
    with loaded(run.with_name(run.name + "-gguf") / f"model-{gguf_type}.gguf", 2) as llm:
        served = [gguf_logits(llm, text) for text in ids]
    return (float(np.mean([np.abs(a - b).mean() for a, b in zip(fake, served)])),
            float(np.mean([np.abs(a - b).mean() for a, b in zip(latent, served)])))


def test_a_self_qad_run_exports_on_its_trained_grid_and_resumes_to_the_same_weights(root, new_process):
    cfg = qad_cfg(root, tiny_lm(root), "llama-run")
    full = distill_lm(cfg)
    metrics = json.loads((root / "llama-run" / "metrics.json").read_text())
    assert metrics["qad"] == {"format": "gguf", "type": "q2_k", "tensors": {"q2_k": 8, "q3_k": 6, "q6_k": 1}}
    assert json.loads((root / "llama-run" / "model" / "config.json").read_text())["tie_word_embeddings"]
    fake, latent = grid_distances(root, root / "llama-run", "q2_k")
    assert fake < GRID_TOLERANCE * latent, (fake, latent)

    def kill(state):
        if state.global_step == 3:
            raise Interrupt

    new_process()
    with pytest.raises(Interrupt):
        distill_lm(qad_cfg(root, tiny_lm(root), "llama-resumed"), on_step=kill)
    new_process()
    assert_same_weights(full.model, distill_lm(qad_cfg(root, tiny_lm(root), "llama-resumed")).model)


def test_a_qwen3_exports_on_its_trained_grid(root):
    run = root / "qwen3-run"
    distill_lm(qad_cfg(root, tiny_lm(root, "qwen3"), run.name, "q4_k_m",
                       train=train_cfg(batch_size=8, eval_batch_size=8, max_steps_per_stage=2)))
    fake, latent = grid_distances(root, run, "q4_k_m")
    assert fake < GRID_TOLERANCE * latent, (fake, latent)


@pytest.mark.parametrize("change, message", [
    (dict(qad=QADConfig(type="q4_k_x")), "llama.cpp knows no GGUF type 'q4_k_x'"),
    (dict(qad=QADConfig(type="f16")), "qad.type f16 is not quantized"),
    (dict(qad=QADConfig(type="iq2_xxs")), "qad.type iq2_xxs needs an importance matrix"),
    (dict(qad=QADConfig(format="ggfu")), "qad.format: no fake quantization for 'ggfu'; did you mean 'gguf'"),
    (dict(train=TrainConfig(sharding="fsdp2")), "qad with train.sharding: fsdp2"),
    (dict(student=StudentConfig(init="pretrained", model="model.Q4_1.gguf")), "is a GGUF file, already quantized"),
])
def test_what_qad_cannot_train_is_refused_before_any_work(root, change, message):
    with pytest.raises(ConfigError, match=message):
        check_lm_distill(qad_cfg(root, tiny_lm(root), "refused", **change))


def test_an_already_quantized_starting_model_is_refused(root, tmp_path):
    folder = tmp_path / "bnb"
    save_smollm2_tokenizer_lm(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ConfigError, match="is already quantized"):
        check_lm_distill(qad_cfg(root, tiny_lm(root), "refused", student=StudentConfig(init="pretrained",
                                                                                          model=str(folder))))
