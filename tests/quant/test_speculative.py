"""Speculative decoding run for real (`quant.measure.speculative`) on a tiny target and a draft of two of its three
layers: the target's greedy tokens are the same with the draft as without, in transformers and in llama.cpp; the
passes and proposals each runtime counts agree with the offline replay (`distill.lm.acceptance`) and with the
target as its own draft; the GGUF draft keeps its cache only over the prefix it shares; a GGUF of another
vocabulary is refused; llama.cpp scores a few tokens in one batch as one at a time; and a teacher of every family the
LM job supports speculates losslessly with a layer-subset draft."""
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from distill.core.config import StudentConfig
from distill.core.errors import ConfigError
from distill.core.models import load_causal_lm
from distill.core.student import build_student
from distill.lm.acceptance import draft_agreement, greedy_tokens_per_pass, model_logits, target_paths
from quant.export.gguf import convert, greedy_ids, loaded
from quant.measure.speculative import (GgufDraft, check_gguf_vocabularies, gguf_speculative, parameter_count,
                                       pass_seconds, torch_speculative)
from tests.conftest import save_smollm2_tokenizer_lm
from tests.helpers.drafts import save_draft_pair
from tests.helpers.families import FAMILIES, tiny_family_model

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")

PROMPTS = [[504, 2330, 436, 1456, 30], [28, 6040, 338, 1654]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_draft_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def torch_pair(pair):
    return load_causal_lm(str(pair["target"])).eval(), load_causal_lm(str(pair["draft"])).eval()


@pytest.mark.parametrize("k", [1, 3])
def test_transformers_output_is_the_targets_and_its_counts_are_the_offline_replays(torch_pair, k):
    target, draft = torch_pair
    matches, _ = draft_agreement(target_paths(target, PROMPTS, NEW_TOKENS), model_logits(draft))
    assert 0.1 < sum(map(sum, matches)) / (len(PROMPTS) * NEW_TOKENS) < 0.9  # the draft is sometimes wrong
    for prompt, row in zip(PROMPTS, matches):
        alone, drafted = torch_speculative(target, None, prompt, NEW_TOKENS), torch_speculative(
            target, draft, prompt, NEW_TOKENS, k)
        assert drafted.tokens == alone.tokens and len(alone.tokens) == NEW_TOKENS
        assert alone.target_passes == NEW_TOKENS and alone.proposed == 0
        assert NEW_TOKENS / drafted.target_passes == pytest.approx(greedy_tokens_per_pass([row], k))
        assert 0 <= drafted.accepted <= drafted.proposed <= k * drafted.target_passes


@pytest.fixture(scope="module")
def gguf_pair(pair):
    with loaded(pair["target.gguf"], 1) as target, loaded(pair["draft.gguf"], 1) as draft, \
            loaded(pair["target.gguf"], 1) as same, loaded(pair["draft.gguf"], 1) as reference:
        yield {"target": target, "draft": draft, "same": same, "reference": reference}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_llama_cpp_output_is_the_targets(gguf_pair, k):
    target = gguf_pair["target"]
    for prompt in PROMPTS:
        alone = gguf_speculative(target, None, prompt, NEW_TOKENS)
        drafted = gguf_speculative(target, gguf_pair["draft"], prompt, NEW_TOKENS, k)
        assert drafted.tokens == alone.tokens and len(alone.tokens) == NEW_TOKENS
        assert 0 <= drafted.accepted <= drafted.proposed == k * (drafted.target_passes - 1)
        # the target as its own draft: every proposal accepted, k + 1 tokens per pass after the prompt's
        itself = gguf_speculative(target, gguf_pair["same"], prompt, NEW_TOKENS, k)
        assert itself.tokens == alone.tokens
        assert itself.target_passes == 1 + math.ceil((NEW_TOKENS - 1) / (k + 1))


def test_the_gguf_draft_proposes_its_own_greedy_continuation_across_calls(gguf_pair):
    gguf_pair["draft"].reset()
    proposer = GgufDraft(gguf_pair["draft"], 3)
    first = PROMPTS[0] + [7, 8]
    second = PROMPTS[0] + [9]  # shares a prefix with what the draft's cache holds, then differs
    for ids in (first, second, second + [11, 12], PROMPTS[1]):
        assert proposer(np.array(ids, dtype=np.intc)).tolist() == greedy_ids(gguf_pair["reference"], ids, 3)
    assert proposer.calls == 4 and proposer.proposed == 12


def test_a_gguf_of_another_vocabulary_is_refused(pair, tmp_path):
    other = save_smollm2_tokenizer_lm(tmp_path / "other", vocab_size=49153)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<draft-only>"])
    tokenizer.save_pretrained(other)
    convert(other, tmp_path / "other.gguf", "f32")
    check_gguf_vocabularies(str(pair["draft.gguf"]), str(pair["target.gguf"]))
    with pytest.raises(ConfigError, match=r"GGUF draft .*other.gguf and GGUF target .*target.gguf have different "
                                          r"vocabularies \(sizes 49153 and 49152"):
        check_gguf_vocabularies(str(tmp_path / "other.gguf"), str(pair["target.gguf"]))


def test_parameters_are_counted_from_the_files(pair, torch_pair):
    target, draft = torch_pair
    assert parameter_count(str(pair["draft"])) == sum(p.numel() for p in draft.parameters())
    assert parameter_count(str(pair["target.gguf"])) == sum(p.numel() for p in target.parameters())


def test_llama_cpp_scores_a_few_tokens_in_one_batch_as_it_does_one_at_a_time(tmp_path):
    """The target checks k draft tokens in one batch: its logits there must be those of decoding token by token, or a
    near-tie flips and the output is no longer the target's own. Without flash attention they differ on this model
    (and on SmolLM2-135M's Q8_0 file; docs/results.md)."""
    folder = save_smollm2_tokenizer_lm(tmp_path / "lm", hidden_size=128, num_attention_heads=4,
                                       initializer_range=0.1)
    convert(folder, tmp_path / "lm.gguf", "q8_0")
    ids = [504, 2330, 436, 1456, 30, 28, 6040, 338, 1654, 7, 8, 9] * 20
    with loaded(tmp_path / "lm.gguf", 2) as llm:
        scores = {}
        for size in (1, 2, 4):
            llm.reset()
            llm.eval(ids[:12])
            for start in range(12, len(ids), size):
                llm.eval(ids[start:start + size])
            scores[size] = np.array(llm.scores[12:len(ids)])
    assert np.array_equal(scores[1], scores[2]) and np.array_equal(scores[1], scores[4])


@pytest.mark.parametrize("runtime", ["transformers", "llama.cpp"])
def test_a_pass_is_timed_over_the_tokens_after_the_prefix_and_leaves_the_cache_at_it(torch_pair, gguf_pair, runtime):
    model = torch_pair[0] if runtime == "transformers" else gguf_pair["same"]
    assert pass_seconds(model, PROMPTS[0], 3, 2) > 0
    if runtime == "llama.cpp":  # the cache holds the prefix and the last pass's tokens, nothing beyond
        assert model.n_tokens == len(PROMPTS[0]) + 3 and model.input_ids[:model.n_tokens].tolist() == PROMPTS[0] + \
            PROMPTS[0][:3]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_speculates_losslessly_and_as_the_offline_replay_counts(family):
    """A tiny teacher of each family the LM job supports (windowed layers shorter than the generation, where the
    family has them), its draft three of its four layers (as `student.layers` copies them)."""
    teacher = tiny_family_model(family, initializer_range=0.1)
    draft = build_student(StudentConfig(layers=[0, 1, 2]), teacher).eval()
    prompts = [[5, 9, 13, 7, 30], [20, 3, 11, 40]]
    matches, _ = draft_agreement(target_paths(teacher, prompts, NEW_TOKENS), model_logits(draft))
    assert 0 < sum(map(sum, matches)) < len(prompts) * NEW_TOKENS  # the draft is sometimes right, sometimes wrong
    for prompt, row in zip(prompts, matches):
        drafted = torch_speculative(teacher, draft, prompt, NEW_TOKENS, 2)
        assert drafted.tokens == torch_speculative(teacher, None, prompt, NEW_TOKENS).tokens
        assert NEW_TOKENS / drafted.target_passes == pytest.approx(greedy_tokens_per_pass([row], 2))
