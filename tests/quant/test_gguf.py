"""GGUF export through llama.cpp's own converter and quantizer, checked in llama.cpp itself: a tiny random Llama with
the offline SmolLM2 tokenizer (a tokenizer llama.cpp's converter knows) exports to F16, Q8_0 and Q4_0; the F16 file
continues every prompt greedily exactly as transformers does, tokenizes as transformers does, and has the same
perplexity on the test texts; the quantized files run and stay close. Types llama.cpp does not know, models with
per-layer widths and unsupported families are refused before any work. Every other family the exporter accepts is
converted too, as a tiny model trained on the corpus, and runs in llama.cpp as in transformers."""
import json

import pytest
import sentencepiece
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from distill.core.fingerprint import file_sha256
from distill.core.models import resolve_model
from quant.config import GgufConfig
from quant.export.gguf import GGUF_FAMILIES, check_gguf, export_gguf, ignored_window
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus
from tests.helpers.lm_models import train_causal_lm

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama whose logits are spread enough (initializer_range 0.2) that greedy choices are not near-ties,
    saved with SmolLM2's tokenizer, and a small corpus."""
    root = tmp_path_factory.mktemp("gguf")
    save_smollm2_tokenizer_lm(root / "lm", initializer_range=0.2)
    write_review_corpus(root / "corpus.txt", 40)
    return root


def gguf_cfg(root, **overrides) -> GgufConfig:
    values = dict(model=str(root / "lm"), output_dir=str(root / "out"), types=["f16", "q8_0", "q4_0"],
                  data=CorpusConfig(source=str(root / "corpus.txt"), max_length=32), validation_examples=5,
                  test_examples=10, eval_examples=6, prompts=["This movie was", "The acting"], max_new_tokens=12)
    values.update(overrides)
    return GgufConfig(**values)


def test_f16_matches_transformers_in_llama_cpp_and_quantized_files_run(tiny_lm):
    result = export_gguf(gguf_cfg(tiny_lm))
    rows = result.metrics["types"]
    f16, reference = rows["f16"], rows["transformers_fp32"]["test_perplexity"]
    assert f16["greedy_equal"] and f16["greedy_token_agreement"] == 1.0 and f16["tokenizer_equal"]
    assert f16["test_perplexity"] == pytest.approx(reference, rel=1e-2)
    assert f16["kld_mean"] < 1e-3 and f16["same_top1"] > 0.99
    assert f16["kld_mean"] < rows["q8_0"]["kld_mean"] < rows["q4_0"]["kld_mean"]  # fewer bits, further away
    for name in ("q8_0", "q4_0"):
        assert (tiny_lm / "out" / f"model-{name}.gguf").is_file()
        assert rows[name]["disk_mb"] < f16["disk_mb"]
        assert rows[name]["test_perplexity"] == pytest.approx(reference, rel=0.2)
    saved = json.loads((tiny_lm / "out" / "metrics.json").read_text())
    assert set(saved["types"]) == {"transformers_fp32", "f16", "q8_0", "q4_0"}


def test_a_finished_folder_rerun_with_another_model_writes_its_files_again(tiny_lm, tmp_path):
    """A rerun of the same config resumes (keeps its files); one of another config must not keep the old model's."""
    first = gguf_cfg(tiny_lm, output_dir=str(tmp_path / "out"), types=["f16"])
    export_gguf(first)
    written = file_sha256(tmp_path / "out" / "model-f16.gguf")
    other = save_smollm2_tokenizer_lm(tmp_path / "other", initializer_range=0.3)
    rerun = export_gguf(gguf_cfg(tiny_lm, model=str(other), output_dir=str(tmp_path / "out"), types=["f16"]))
    assert file_sha256(tmp_path / "out" / "model-f16.gguf") != written
    assert rerun.metrics["types"]["f16"]["greedy_equal"]  # the file is the new model's


@pytest.mark.parametrize("types, message", [
    (["f16", "q4_k_x"], "types: llama.cpp knows no GGUF type 'q4_k_x'; did you mean 'q4_k_"),
    (["f16", "f16"], "types lists a type twice"),
    ([], "types lists nothing"),
])
def test_types_llama_cpp_does_not_know_are_refused(tiny_lm, types, message):
    with pytest.raises(ConfigError, match=message):
        check_gguf(gguf_cfg(tiny_lm, types=types))


def test_per_layer_widths_and_other_families_are_refused_before_any_work(tmp_path, tiny_lm):
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    config = json.loads((tiny_lm / "lm" / "config.json").read_text())
    (compressed / "config.json").write_text(json.dumps({**config, "compression": {"linear_shapes": {}}}))
    with pytest.raises(ConfigError, match="per-layer shapes .* that llama.cpp cannot run"):
        check_gguf(gguf_cfg(tiny_lm, model=str(compressed)))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="GGUF export supports the families llama, .*; 'gpt2' is not one of them"):
        check_gguf(gguf_cfg(tiny_lm, model=str(gpt2)))



S, F = "sliding_attention", "full_attention"


@pytest.mark.parametrize("family, layer_types, window, refused", [
    ("gemma2", [S, F, S, F], 6, None),
    ("gemma2", [F, S, S, F], 6, r"layers \[0, 1\] of .* differ, so its GGUF would attend differently beyond 6 tokens"),
    ("gemma2", [F, S, S, F], 256, None),  # a window as long as the context: every layer attends to all of it
    ("gemma3_text", [S, S, S, S, S], 6, None),  # the sixth layer dropped: the layout holds
    ("gemma3_text", [S, S, S, S, F], 6, r"every 6th layer on full attention .* layers \[4\]"),  # the second dropped
])
def test_a_gemma_whose_layers_leave_llama_cpps_layout_is_refused(tmp_path, tiny_lm, family, layer_types, window,
                                                                  refused):
    """llama.cpp assumes each Gemma's sliding/full layout (its converter keeps the window, not layer_types)."""
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": family, "layer_types": layer_types,
                                                    "sliding_window": window, "max_position_embeddings": 256}))
    if refused is None:
        check_gguf(gguf_cfg(tiny_lm, model=str(folder)))
    else:
        with pytest.raises(ConfigError, match=refused):
            check_gguf(gguf_cfg(tiny_lm, model=str(folder)))


def test_a_window_llama_cpp_ignores_is_reported():
    context = {"max_position_embeddings": 256}
    assert "ignores Mistral's sliding_window=6" in ignored_window({"model_type": "mistral", "sliding_window": 6,
                                                                    **context})
    assert ignored_window({"model_type": "mistral", "sliding_window": 4096, **context}) is None
    assert ignored_window({"model_type": "mistral", "sliding_window": None, **context}) is None
    assert "ignores qwen3's use_sliding_window" in ignored_window({"model_type": "qwen3", "use_sliding_window": True,
                                                                   "sliding_window": 6, **context})
    assert ignored_window({"model_type": "qwen3", "use_sliding_window": False, "sliding_window": 6, **context}) is None


FAMILIES = {
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6, "num_hidden_layers": 6},
    "phi3": {},
}
"""What each family (llama aside: the model above) needs beyond the shared tiny widths. The sliding windows are
shorter than the test texts, so that they take part; Gemma 3 has the six layers of its sliding/full pattern (llama.cpp
assumes the pattern, five sliding layers then a full one)."""
SENTENCEPIECE = {"gemma2", "qwen2"}
"""Families given a SentencePiece model (`tokenizer.model`) for the converter. Gemma 2's converter reads nothing else.
Qwen 2's reads one first: transformers 5 loads the tokenizer of any qwen2 folder as Qwen2's (its pre-tokenizer over
the folder's vocabulary), which llama.cpp's converter recognises only with Qwen 2's own vocabulary, not offline here;
so transformers and llama.cpp tokenize a qwen2 folder differently, and only its model is compared."""
PROMPTS = ["review 3: the film", "review 5: the acting"]
"""Prompts the trained models continue confidently (the corpus sentence), so no greedy choice is a near-tie."""


def family_tokenizer(family, folder, lines):
    """SmolLM2's tokenizer, or for `SENTENCEPIECE` families, a SentencePiece model trained on `lines`."""
    if family not in SENTENCEPIECE:
        return AutoTokenizer.from_pretrained(resolve_model("offline:SmolLM2-135M-Instruct"))
    folder.mkdir(parents=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


def save_family_lm(folder, family, lines):
    """A tiny model of `family` trained on `lines` (confident predictions, and every norm and bias moved away from its
    initial value, so that a converter that drops, swaps or mis-shifts any tensor changes the answer)."""
    tokenizer = family_tokenizer(family, folder, lines)
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256,
        "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        **FAMILIES[family]})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if family == "phi3":  # its converter reads a GPT-2 vocabulary only when the config names that class (as Phi-4's)
        config_file = folder / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as the export loads it
    train_causal_lm(model, [tokenizer(line)["input_ids"] for line in lines], steps=40).save_pretrained(folder)
    return folder


def test_every_family_the_exporter_accepts_is_tested():
    assert {"llama", *FAMILIES} == set(GGUF_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_in_llama_cpp_as_in_transformers(tmp_path, tiny_lm, family):
    # llama.cpp gives models named like Phi-3 (the folder's name) Phi-3's special tokens, which SmolLM2's lacks
    model = save_family_lm(tmp_path / "lm", family, (tiny_lm / "corpus.txt").read_text().splitlines()[:16])
    cfg = gguf_cfg(tiny_lm, model=str(model), output_dir=str(tmp_path / "out"), types=["f16"], prompts=PROMPTS,
                   max_new_tokens=6)
    rows = export_gguf(cfg).metrics["types"]
    assert rows["f16"]["greedy_equal"] and (rows["f16"]["tokenizer_equal"] or family == "qwen2")
    assert rows["f16"]["test_perplexity"] == pytest.approx(rows["transformers_fp32"]["test_perplexity"], rel=2e-3)
