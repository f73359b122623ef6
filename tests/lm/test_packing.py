"""Packed causal-LM training data: hand-made texts and prompt/completion examples pack into the blocks, position ids
and labels worked out by hand; a packed batch reaches the model without its attention mask and cache, and each text
of a packed block gets exactly the logits it gets alone (Llama, Qwen2 and Gemma3 with sliding windows shorter than
the texts; SDPA and eager attention); whole-text perplexity scores every token once through sliding windows; runs
pack where they can (prompt/completion examples whole), refuse packing where they cannot, and count the targets they
trained on."""
import itertools
import json
import math

import pytest
import torch
from accelerate import Accelerator

from distill.core.config import CorpusConfig, LossConfig, StageConfig
from distill.core.data import corpus_tokens
from distill.core.errors import ConfigError
from distill.core.loss_interface import model_inputs
from distill.lm.data import LMCollator
from distill.lm.job import check_lm_distill, distill_lm
from distill.lm.metrics import perplexity, sliding_windows, whole_text_perplexity
from distill.lm.packing import pack_examples, pack_texts, packs
from tests.conftest import make_sentences, make_tokenizer, train_cfg
from tests.helpers.families import VOCAB, tiny_family_model
from tests.helpers.lm_runs import WORDS, lm_cfg

X = -100


def test_texts_end_with_eos_and_are_cut_into_blocks_whose_positions_restart_at_every_text():
    blocks = pack_texts([[5, 6, 7], [8, 9], [10, 11, 12, 2]], eos_id=2, max_length=4)
    assert blocks == {"input_ids": [[5, 6, 7, 2], [8, 9, 2, 10], [11, 12, 2]],
                      "position_ids": [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2]],
                      "labels": [[X, 6, 7, 2], [X, 9, 2, X], [X, 12, 2]]}


def test_whole_examples_fill_blocks_greedily_and_only_completions_are_targets():
    blocks = pack_examples([[1, 2, 3], [4, 5], [6, 7, 8], [9]], prompt_lengths=[1, 1, 2, 0], max_length=5)
    assert blocks == {"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9]],
                      "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 0]],
                      "labels": [[X, 2, 3, X, 5], [X, X, 8, X]]}


def test_a_packed_batch_pads_its_labels_and_positions_and_reaches_the_model_without_mask_or_cache():
    features = [{"input_ids": [5, 6, 7], "position_ids": [0, 1, 0], "labels": [X, 6, X]},
                {"input_ids": [8], "position_ids": [0], "labels": [X]}]
    batch = LMCollator(make_tokenizer(WORDS))(features)
    assert batch["labels"].tolist() == [[X, 6, X], [X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs and inputs["use_cache"] is False and "labels" not in inputs
    plain = LMCollator(make_tokenizer(WORDS))([{"input_ids": [5, 6, 7]}])
    assert set(model_inputs(plain)) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_text_of_a_packed_block_gets_the_logits_it_gets_alone(family, attention):
    """Texts of 7 to 11 tokens in blocks of 16: pieces are cut, padded, and longer than the sliding window (4)."""
    model = tiny_family_model(family, attn_implementation=attention)
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (7, 11, 9, 8, 10)]
    blocks = pack_texts(texts, eos_id=2, max_length=16)
    features = [dict(zip(blocks, row)) for row in zip(*blocks.values())]
    batch = LMCollator(make_tokenizer(WORDS))(features)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        for row, positions in enumerate(batch["position_ids"]):
            real = int(batch["attention_mask"][row].sum())
            starts = [*(positions[:real] == 0).nonzero().flatten().tolist(), real]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][row:row + 1, start:end]).logits[0]
                torch.testing.assert_close(packed[row, start:end], alone, rtol=1e-4, atol=1e-5)


def test_sliding_windows_score_every_token_but_the_first_once():
    windows = sliding_windows(list(range(10)), max_length=4)
    assert windows == [{"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]},
                       {"input_ids": [2, 3, 4, 5], "labels": [X, X, 4, 5]},
                       {"input_ids": [4, 5, 6, 7], "labels": [X, X, 6, 7]},
                       {"input_ids": [6, 7, 8, 9], "labels": [X, X, 8, 9]}]
    assert sliding_windows([4, 5, 6], max_length=8) == [{"input_ids": [4, 5, 6], "labels": [4, 5, 6]}]


def test_whole_text_perplexity_is_the_perplexity_of_the_whole_texts_when_the_window_holds_them():
    model = tiny_family_model("llama")
    texts = [list(range(3, 3 + length)) for length in (5, 12, 9)]
    collate, accelerator = LMCollator(make_tokenizer(WORDS)), Accelerator(cpu=True)
    whole = perplexity(model, [collate([{"input_ids": ids}]) for ids in texts], accelerator)
    assert whole_text_perplexity(model, texts, 12, collate, 2, accelerator) == pytest.approx(whole, rel=1e-5)
    windowed = whole_text_perplexity(model, texts, 4, collate, 2, accelerator)
    assert windowed != pytest.approx(whole, rel=1e-3) and math.isfinite(windowed)


def test_plain_text_runs_pack_where_they_can_and_count_every_target_they_trained_on(tmp_path, teacher_dir, corpus):
    """One epoch over the training texts: packed, every token but each piece's first is a target; truncated, each
    text's first max_length tokens but its first."""
    tokenizer = make_tokenizer(WORDS)
    lengths = [len(ids) for ids in tokenizer([text for text, _ in make_sentences(60)[:44]])["input_ids"]]
    metrics = {}
    assert CorpusConfig().packing is False  # the default: every published figure was measured truncated
    for packing in (None, False):
        cfg = lm_cfg(tmp_path / str(packing), teacher_dir, CorpusConfig(source=corpus.source, max_length=8,
                                                                        packing=packing),
                     train=train_cfg(batch_size=8, eval_batch_size=8))
        distill_lm(cfg)
        metrics[packing] = json.loads((tmp_path / str(packing) / "run" / "metrics.json").read_text())
    ends = set(itertools.accumulate(lengths))  # the tokenizer has no eos: texts are laid end to end as they are
    cuts = [cut for cut in range(8, sum(lengths), 8) if cut not in ends]  # block boundaries inside a text
    assert metrics[None]["packing"] is True and "train" not in metrics[None]["truncation"]
    assert metrics[None]["train_target_tokens"] == sum(lengths) - len(lengths) - len(cuts)
    assert metrics[None]["train_examples"] == math.ceil(sum(lengths) / 8) and metrics[False]["train_examples"] == 44
    assert metrics[False]["packing"] is False and "train" in metrics[False]["truncation"]
    assert metrics[False]["train_target_tokens"] == sum(min(length, 8) - 1 for length in lengths)
    for run in metrics.values():
        assert run["test_perplexity_whole"] > 1 and run["test_perplexity"] > 1


def test_prompt_completion_runs_pack_whole_examples_and_train_on_every_completion_token(tmp_path, teacher_dir,
                                                                                        pairs_file):
    corpus = CorpusConfig(source=str(pairs_file), format="prompt_completion", chat_template=False, max_length=32,
                          packing=None)
    tokens = corpus_tokens(corpus, make_tokenizer(WORDS))
    distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, train=train_cfg(batch_size=8, eval_batch_size=8)))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["packing"] is True and "test_perplexity_whole" not in metrics
    completions = [len(ids) - prompt for ids, prompt in zip(tokens.ids[:44], tokens.prompt_lengths[:44])]
    assert metrics["splits"]["train"] == [0, 44] and metrics["train_target_tokens"] == sum(completions)


@pytest.mark.parametrize("change, message", [
    ({"cache": "somewhere", "stages": [StageConfig(losses=[LossConfig(name="topk_kl")])]}, "a teacher cache holds"),
    ({"student_tokenizer": "somewhere"}, "student_tokenizer aligns"),
])
def test_packing_is_refused_in_one_line_where_it_cannot_pack_and_left_off_when_null(tmp_path, corpus, change,
                                                                                    message):
    cfg = lm_cfg(tmp_path, tmp_path / "absent", CorpusConfig(source=corpus.source, packing=True), **change)
    with pytest.raises(ConfigError, match=f"data.packing: true cannot pack .*{message}"):
        check_lm_distill(cfg)
    cfg.data.packing = None
    assert not packs(cfg)
