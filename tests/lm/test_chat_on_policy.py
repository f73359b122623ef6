"""Prompt/completion and chat data (the completion's tokens the only targets, long prompts dropped and counted, a
missing chat template refused), the KV-cached sampler (greedy equals transformers' generate, seeded draws repeat,
the nucleus), on-policy batches (the student's completions, counted; a resumed run equals an uninterrupted one), the
teacher's NLL of the student's completions against a hand computation, and the settings refused before work."""
import json
import math

import pytest
import torch

from distill.core.chat import PromptCompletion, example_ids, pairs_from_rows, tokenize_pairs
from distill.core.config import CorpusConfig, LossConfig, StageConfig
from distill.core.data import corpus_tokens, load_pairs
from distill.core.errors import ConfigError
from distill.core.trainer import TrainState
from distill.lm.config import LMEvalConfig, OnPolicyConfig
from distill.lm.data import LMCollator, held_out_splits
from distill.lm.job import check_lm_distill, distill_lm
from distill.lm.metrics import distinct_bigrams, teacher_nll_of_completions
from distill.lm.on_policy import OnPolicyBatches
from distill.lm.sampling import SamplingConfig, complete, pack_completions, pick_tokens, stop_tokens
from tests.conftest import Interrupt, assert_same_weights, make_tokenizer, tiny_causal_lm
from tests.helpers.lm_runs import WORDS, chat_tokenizer, lm_cfg

JSD = [LossConfig(name="jsd", beta=0.5)]


@pytest.fixture
def teacher_dir(tmp_path):
    tokenizer = chat_tokenizer()
    tiny_causal_lm(len(tokenizer), tied=True).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_with_and_without_the_template_and_chat_messages():
    tokenizer = chat_tokenizer()
    full, prompt = example_ids(tokenizer, PromptCompletion([{"role": "user", "content": "the film"}], "was good"))
    assert full == ids(tokenizer, "the film [SEP] [CLS] was good [SEP]") and prompt == 4
    plain, prompt = example_ids(tokenizer, PromptCompletion("the film", "was good"))
    assert plain == [2, *ids(tokenizer, "the film"), 3, *ids(tokenizer, "was good"), 3] and prompt == 4
    rows = {"messages": [[{"role": "system", "content": "a"}, {"role": "user", "content": "the film"},
                          {"role": "assistant", "content": "was good"}]]}
    (pair,) = pairs_from_rows(rows, CorpusConfig(format="chat"))
    assert pair.prompt == rows["messages"][0][:2] and pair.completion == "was good"
    with pytest.raises(ConfigError, match="row 0 does not end with an assistant message"):
        pairs_from_rows({"messages": [rows["messages"][0][:2]]}, CorpusConfig(format="chat"))


def test_only_the_completion_tokens_are_targets_and_long_prompts_are_dropped_and_counted():
    tokenizer = chat_tokenizer()
    pairs = [PromptCompletion([{"role": "user", "content": "the film"}], "was good and fine"),
             PromptCompletion([{"role": "user", "content": "the film was a very dull story"}], "bad"),
             PromptCompletion([{"role": "user", "content": "it"}], "was bad")]
    corpus = tokenize_pairs(tokenizer, pairs, max_length=6, uses_template=True)
    assert corpus.dropped == 1 and corpus.prompt_lengths == [4, 3]
    assert corpus.ids[0] == ids(tokenizer, "the film [SEP] [CLS] was good") and corpus.full_lengths[0] == 9
    batch = LMCollator(tokenizer)([{"input_ids": i, "prompt_length": n} for i, n in zip(corpus.ids,
                                                                                        corpus.prompt_lengths)])
    expected = [[-100] * 4 + ids(tokenizer, "was good"), [-100] * 3 + ids(tokenizer, "was bad [SEP]")]
    assert batch["labels"].tolist() == expected and "prompt_length" not in batch
    with pytest.raises(ConfigError, match="every one of the 3 examples has a prompt of at least"):
        tokenize_pairs(tokenizer, pairs, max_length=2, uses_template=True)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="needs the tokenizer's chat template, and this tokenizer has none"):
        tokenize_pairs(tokenizer, pairs, max_length=6, uses_template=True)


def test_local_pairs_are_shuffled_limited_and_split_with_their_prompt_lengths(pairs_file):
    tokenizer = chat_tokenizer()
    corpus = CorpusConfig(source=str(pairs_file), format="prompt_completion", shuffle_seed=0, limit=40, max_length=32)
    pairs = load_pairs(corpus)
    assert len(pairs) == 40 and pairs == load_pairs(corpus)
    tokens = corpus_tokens(corpus, tokenizer)
    splits, ranges = held_out_splits(tokens, type("Cfg", (), {"validation_examples": 5, "test_examples": 5}),
                                     with_cache_index=False)
    assert splits["test"]["prompt_length"] == tokens.prompt_lengths[35:] and ranges["test"] == [35, 40]
    with pytest.raises(ConfigError, match="reads column 'answer'"):
        load_pairs(CorpusConfig(source=str(pairs_file), format="prompt_completion", completion_column="answer"))
    with pytest.raises(ConfigError, match="data.format 'dialogue' is not one of"):
        load_pairs(CorpusConfig(source=str(pairs_file), format="dialogue"))


def test_the_offline_review_continuation_task():
    pairs = load_pairs(CorpusConfig(source="offline:imdb_continue", format="prompt_completion", limit=50))
    assert len(pairs) == 50
    assert all(p.prompt[0]["content"].startswith("Continue this movie review:\n\n") for p in pairs)
    assert all(len(p.completion.split()) == 48 and "<br" not in p.completion for p in pairs)


def test_greedy_completions_equal_transformers_generate_and_seeded_samples_repeat():
    # large random weights: each greedy token depends on the whole context, so a sampler that loses or misplaces its
    # KV cache writes other tokens (a small init only repeats the last token, with a cache or without)
    model = tiny_causal_lm(40, tied=False, initializer_range=1.0)
    prompts = [[2, 10, 11, 12], [2, 13]]  # the shorter one left-padded in the batch
    greedy = complete(model, prompts, SamplingConfig(temperature=0, max_new_tokens=10), {3}, pad_id=0)
    for prompt, completion in zip(prompts, greedy):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=3,
                             pad_token_id=0)
        assert completion == out[0, len(prompt):].tolist()
        assert len(set(completion)) >= 5
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    draw = [complete(model, prompts, sampling, set(), 0, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draw[0] == draw[1] and draw[0] != draw[2] and all(len(c) == 6 for c in draw[0])


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]] * 2000)
    drawn = pick_tokens(logits, SamplingConfig(top_p=0.75), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2:].sum() == 0 and abs(counts[0] - 0.5 / 0.8) < 0.04
    assert pick_tokens(logits[:1], SamplingConfig(temperature=0), None).item() == 0


def test_on_policy_batches_hold_the_students_completions_of_the_prompts():
    tokenizer = chat_tokenizer()
    student = tiny_causal_lm(len(tokenizer), tied=True)
    examples = [ids(tokenizer, "the film [SEP] [CLS] was good [SEP]"), ids(tokenizer, "a plot [SEP] [CLS] bad [SEP]")]
    batch = LMCollator(tokenizer)([{"input_ids": i, "prompt_length": 4} for i in examples])
    cfg = OnPolicyConfig(lmbda=1.0, temperature=0.0, max_new_tokens=5)
    transform = OnPolicyBatches(cfg, tokenizer, seed=0, rank=0)
    out = transform(batch, TrainState(), student)
    expected = complete(student, [e[:4] for e in examples], SamplingConfig(0.0, 1.0, 5), {3}, 0)
    assert out["labels"].tolist() == pack_completions([e[:4] for e in examples], expected, 0)["labels"].tolist()
    assert transform.counts["on_policy_batches"] == 1
    assert transform.counts["target_tokens"] == sum(len(c) for c in expected)
    off = OnPolicyBatches(OnPolicyConfig(lmbda=0.0), tokenizer, seed=0, rank=0)
    assert off(batch, TrainState(), student) is batch and off.counts["on_policy_batches"] == 0
    draws = [OnPolicyBatches(cfg, tokenizer, seed, rank).generator(TrainState(stage=1, epoch=9, batches_done=99))
             .initial_seed() for seed, rank in ((10 ** 9, 3), (10 ** 9, 3), (10 ** 9, 4))]
    assert draws[0] == draws[1] != draws[2]  # any seed; each process draws its own samples
    share = OnPolicyBatches(OnPolicyConfig(lmbda=0.5, max_new_tokens=1), tokenizer, seed=0, rank=0)
    for index in range(40):
        share(batch, TrainState(batches_done=index), student)
    assert 10 <= share.counts["on_policy_batches"] <= 30


def test_plain_text_on_policy_batches_continue_each_texts_opening():
    tokenizer = make_tokenizer(WORDS)
    student = tiny_causal_lm(len(tokenizer), tied=True)
    texts = [ids(tokenizer, "the film was good and the plot was fine"), ids(tokenizer, "a bad movie")]
    batch = LMCollator(tokenizer)([{"input_ids": i} for i in texts])  # right-padded, every real token a target
    transform = OnPolicyBatches(OnPolicyConfig(lmbda=1.0, temperature=0.0, max_new_tokens=5, prompt_tokens=4),
                                tokenizer, seed=0, rank=0, plain_text=True)
    out = transform(batch, TrainState(), student)
    prompts = [texts[0][:4], texts[1][:len(texts[1]) - 1]]  # the short text keeps one token to continue
    expected = complete(student, prompts, SamplingConfig(0.0, 1.0, 5), stop_tokens(tokenizer), tokenizer.pad_token_id)
    assert out["labels"].tolist() == pack_completions(prompts, expected, tokenizer.pad_token_id)["labels"].tolist()
    assert out["input_ids"][0, :4].tolist() == texts[0][:4]


def test_a_plain_text_on_policy_run_trains_a_draft_on_its_own_samples(tmp_path, teacher_dir, corpus):
    losses = [LossConfig(name="total_variation"), LossConfig(name="forward_kl", weight=0.5)]
    distill_lm(lm_cfg(tmp_path, teacher_dir, corpus, losses,
                      on_policy=OnPolicyConfig(lmbda=1.0, max_new_tokens=4, prompt_tokens=3)))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["on_policy"]["on_policy_batches"] == metrics["on_policy"]["batches"] == 3
    assert metrics["packing"] is False and metrics["draft_acceptance"]["prompts"] == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train_total_variation", 0) > 0 for r in records)


def on_policy_cfg(tmp_path, teacher_dir, pairs_file, name="run", **overrides):
    corpus = CorpusConfig(source=str(pairs_file), format="prompt_completion", max_length=32)
    values = dict(data=corpus, output_dir=str(tmp_path / name), stages=[StageConfig(epochs=2, learning_rate=1e-3,
                                                                                     losses=JSD)],
                  on_policy=OnPolicyConfig(lmbda=0.5, max_new_tokens=6),
                  eval=LMEvalConfig(prompts=["the film"], max_new_tokens=6, teacher_nll_prompts=4))
    values.update(overrides)
    return lm_cfg(tmp_path, teacher_dir, corpus, **values)


def test_an_on_policy_run_trains_scores_its_completions_and_resumes_to_the_same_weights(
        tmp_path, teacher_dir, pairs_file, new_process):
    cfg = on_policy_cfg(tmp_path, teacher_dir, pairs_file)
    cfg.train.max_steps_per_stage, cfg.train.save_steps = 8, 3
    full = distill_lm(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["on_policy"]["on_policy_batches"] < metrics["on_policy"]["batches"] == 8
    assert metrics["test_teacher_nll"] > 0 and 1 <= metrics["test_completion_tokens"] <= 6
    assert len((tmp_path / "run" / "completions.jsonl").read_text().splitlines()) == 4

    def kill(state):
        if state.global_step == 5:
            raise Interrupt

    resumed_cfg = on_policy_cfg(tmp_path, teacher_dir, pairs_file, name="resumed")
    resumed_cfg.train.max_steps_per_stage, resumed_cfg.train.save_steps = 8, 3
    new_process()
    with pytest.raises(Interrupt):
        distill_lm(resumed_cfg, on_step=kill)
    new_process()
    resumed = distill_lm(resumed_cfg)
    assert_same_weights(full.model, resumed.model)


def test_the_teachers_nll_of_the_students_completions_by_hand():
    student, teacher = tiny_causal_lm(40, tied=True), tiny_causal_lm(40, tied=False, hidden_size=16)
    prompts = [[2, 10, 11], [2, 12]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=4)
    scores, completions = teacher_nll_of_completions(student, teacher, prompts, greedy, set(), 0, batch_size=1)
    nll = []
    for prompt, completion in zip(prompts, completions):
        logits = teacher(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        nll += [-logits[len(prompt) + i - 1, token].item() for i, token in enumerate(completion)]
    assert completions == complete(student, prompts, greedy, set(), 0)
    assert scores["teacher_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert scores["completion_tokens"] == 4
    bigrams = [tuple(c[i:i + 2]) for c in completions for i in range(3)]
    assert scores["completion_distinct_2"] == len(set(bigrams)) / 6
    assert distinct_bigrams([[1, 2, 1, 2, 1], [3, 4]]) == 3 / 5


@pytest.mark.parametrize("change, message", [
    ({"on_policy": OnPolicyConfig(lmbda=1.5)}, "on_policy.lmbda is the share of on-policy batches, in"),
    ({"on_policy": OnPolicyConfig(lmbda=0.5, top_p=0)}, r"on_policy.top_p must be in \(0, 1\]"),
    ({"data": CorpusConfig(format="text"), "on_policy": OnPolicyConfig(lmbda=0.5, prompt_tokens=0)},
     "on_policy.prompt_tokens is the length of the texts' openings the student continues, at least 1; got 0"),
    ({"stages": [StageConfig(losses=[*JSD, LossConfig(name="next_token_ce")])]}, "its own samples"),
    ({"stages": [StageConfig(losses=[LossConfig(name="topk_kl")])], "cache": "c"}, "not a cache"),
    ({"eval": LMEvalConfig(prompt_tokens=0)}, "eval.prompt_tokens at least 1"),
])
def test_on_policy_settings_are_refused_before_work(tmp_path, teacher_dir, pairs_file, change, message):
    with pytest.raises(ConfigError, match=message):
        check_lm_distill(on_policy_cfg(tmp_path, teacher_dir, pairs_file, **change))
