"""A student with its own tokenizer: the batch carries the teacher's tokenization and the aligned pairs (each pair's
next tokens begin at the same character), a fresh student takes the student tokenizer's vocabulary (and, of a Gemma3
teacher, the attention kinds of the teacher layers it stands for), `aligned_kl` and `uld` train it from the live
teacher, the loss equals the pure function on the aligned rows, and the settings that cannot work are refused before
work, each for its own reason on a config otherwise valid."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.core.config import CorpusConfig, LossConfig, StageConfig, StudentConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup, build_losses
from distill.lm.align import cross_tokenized, shared_vocabulary
from distill.lm.cache.job import build_from_config
from distill.lm.config import CacheConfig, LMEvalConfig, OnPolicyConfig
from distill.lm.data import CrossTokenizerCollator
from distill.lm.job import check_lm_distill, check_on_policy, distill_lm
from distill.losses.causal.cross_tokenizer import ALIGNED_KEYS, aligned_kl, aligned_topk_kl, topk_bucket_probs
from tests.conftest import make_sentences, make_tokenizer, save_smollm2_tokenizer_lm, tiny_causal_lm
from tests.helpers.lm_runs import WORDS, lm_cfg
from tests.helpers.student_families import family_config

CROSS = [LossConfig(name="aligned_kl", weight=1.0), LossConfig(name="next_token_ce", weight=1.0)]
CACHED_CROSS = [LossConfig(name="aligned_topk_kl"), LossConfig(name="next_token_ce")]
TEXTS = ["the film was good", "a very dull plot and flat acting"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_smollm2_tokenizer_lm(tmp_path_factory.mktemp("teacher"))


@pytest.fixture
def student_tokenizer_dir(tmp_path):
    make_tokenizer(WORDS).save_pretrained(tmp_path / "student-tokenizer")
    return tmp_path / "student-tokenizer"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(text for text, _ in make_sentences(60)) + "\n")
    return CorpusConfig(source=str(path), max_length=16)


def cross_cfg(tmp_path, teacher_dir, tokenizer_dir, corpus, losses=CROSS, **overrides):
    values = dict(student_tokenizer=str(tokenizer_dir), student=StudentConfig(init="fresh", num_layers=1),
                  stages=[StageConfig(epochs=1, learning_rate=1e-3, losses=losses)],
                  eval=LMEvalConfig(prompts=["the film was"], max_new_tokens=3))
    values.update(overrides)
    return lm_cfg(tmp_path, teacher_dir, corpus, **values)


def test_the_batch_carries_both_tokenizations_and_pairs_whose_next_tokens_start_together(teacher_dir):
    student_tok, teacher_tok = make_tokenizer(WORDS), AutoTokenizer.from_pretrained(teacher_dir)
    corpus = cross_tokenized(TEXTS, student_tok, teacher_tok, max_length=16)
    batch = CrossTokenizerCollator(student_tok, teacher_pad_id=0)([
        {name: corpus.columns[name][i] if name in corpus.columns else corpus.ids[i]
         for name in ("input_ids", *corpus.columns)} for i in range(len(TEXTS))])
    for row, text in enumerate(TEXTS):
        student_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        teacher_ids = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()].tolist()
        assert student_ids == student_tok(text)["input_ids"] and teacher_ids == teacher_tok(text)["input_ids"]
        pairs = [(s, t) for s, t in zip(*(batch[key][row].tolist() for key in ALIGNED_KEYS)) if s >= 0]
        # every word starts a token on both sides: a pair per word but the first, which the teacher (no bos token)
        # never predicts
        assert len(pairs) == len(text.split()) - 1
        for s, t in pairs:
            assert student_tok.decode([student_ids[s + 1]]).strip() == teacher_tok.decode([teacher_ids[t + 1]]).strip()


def test_the_loss_is_aligned_kl_on_the_aligned_rows(teacher_dir):
    student_tok, teacher_tok = make_tokenizer(WORDS), AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = tiny_causal_lm(len(student_tok), tied=True)
    corpus = cross_tokenized(TEXTS[:1], student_tok, teacher_tok, max_length=16)
    batch = CrossTokenizerCollator(student_tok, 0)([{"input_ids": corpus.ids[0],
                                                     **{k: v[0] for k, v in corpus.columns.items()}}])
    vocab = shared_vocabulary(student_tok, teacher_tok)
    (loss,) = build_losses([LossConfig(name="aligned_kl", temperature=2.0)],
                           LossSetup(student.config, teacher.config, None, None, vocab)).values()
    s_out = student(input_ids=batch["input_ids"], output_hidden_states=True)
    t_out = teacher(input_ids=batch["teacher_input_ids"], output_hidden_states=True)
    value = loss(LossInputs(s_out, t_out, batch["labels"], batch["attention_mask"], None, batch,
                            student.get_output_embeddings(), teacher.get_output_embeddings()))
    s_at, t_at = (batch[key][0] for key in ALIGNED_KEYS)
    expected = aligned_kl(s_out.logits[0, s_at], t_out.logits[0, t_at], vocab, 2.0).mean() * 4
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 0
    value.backward()
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["aligned_kl", "uld"])
def test_a_student_with_its_own_tokenizer_trains_from_the_teacher(tmp_path, teacher_dir, student_tokenizer_dir,
                                                                   corpus, loss):
    result = distill_lm(cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, corpus,
                                  [LossConfig(name=loss), LossConfig(name="next_token_ce")]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get(f"train_{loss}", 0) > 0 for r in records)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_perplexity"] > 1 and "shared buckets" in metrics["shared_vocabulary"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.vocab_size == len(WORDS) + 5 and reloaded.config.num_hidden_layers == 1
    ids = torch.tensor([[2, 10, 11, 3]])
    assert torch.equal(reloaded.eval()(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "model").get_vocab() == make_tokenizer(WORDS).get_vocab()


def test_the_refused_settings_below_change_valid_configs(tmp_path, teacher_dir, student_tokenizer_dir, corpus):
    check_lm_distill(cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, corpus))
    check_lm_distill(cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, corpus, CACHED_CROSS, cache="c"))


def test_a_fresh_student_of_a_gemma3_teacher_reads_its_own_tokenizer(tmp_path, teacher_dir, student_tokenizer_dir,
                                                                     corpus):
    """Such a student once failed at save: it kept the teacher's list of attention kinds, one per teacher layer."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(family_config("gemma3_text", vocab_size=len(tokenizer)))
    gemma.save_pretrained(tmp_path / "gemma3")
    tokenizer.save_pretrained(tmp_path / "gemma3")
    result = distill_lm(cross_cfg(tmp_path, tmp_path / "gemma3", student_tokenizer_dir, corpus,
                                  student=StudentConfig(init="fresh", num_layers=3)))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert reloaded.config.layer_types == [gemma.config.layer_types[i] for i in (1, 3, 5)]  # the uniform map's
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("change, message", [
    ({"student_tokenizer": None}, "loss 'aligned_kl' is for a student whose tokenizer differs from the teacher's"),
    ({"losses": [LossConfig(name="forward_kl")]}, "student_tokenizer: loss 'forward_kl' compares the two models"),
    ({"losses": [*CROSS, LossConfig(name="hidden_mse")]}, "student_tokenizer: loss 'hidden_mse' compares"),
    ({"losses": [LossConfig(name="topk_kl"), *CACHED_CROSS], "cache": "c"},
     "student_tokenizer: loss 'topk_kl' compares"),
    ({"losses": [*CACHED_CROSS, LossConfig(name="aligned_kl")], "cache": "c"},
     "'aligned_topk_kl' reads a teacher cache and 'aligned_kl' / 'uld' the live teacher: use one or the other"),
    ({"losses": CACHED_CROSS}, "loss 'aligned_topk_kl' reads a teacher cache: set `cache`"),
    ({"data": {"format": "prompt_completion"}}, "student_tokenizer: texts are aligned .* which needs data.format text"),
    ({"student": StudentConfig(layers=[1])}, "student_tokenizer: a student copied .* use student.init fresh"),
])
def test_cross_tokenizer_settings_are_refused_before_work(tmp_path, teacher_dir, student_tokenizer_dir, corpus,
                                                          change, message):
    change = {**change, "data": replace(corpus, **change.get("data", {}))}
    with pytest.raises(ConfigError, match=message):
        check_lm_distill(cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, corpus, **change))


def test_on_policy_with_another_tokenizer_is_refused(tmp_path, teacher_dir, student_tokenizer_dir, corpus):
    cfg = cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, replace(corpus, format="chat"),
                    [LossConfig(name="aligned_kl")], on_policy=OnPolicyConfig(lmbda=0.5))
    check_on_policy(cfg)  # prompts to complete and a live teacher's token loss: on-policy as such is set up
    with pytest.raises(ConfigError, match="student_tokenizer: on-policy batches need the teacher to read the "
                                          "student's tokens"):
        check_lm_distill(cfg)


def test_aligned_kl_from_cached_rows_equals_the_live_value_when_the_slots_hold_the_whole_distribution():
    vocab = SimpleNamespace(student_ids=torch.tensor([0, 1, 2]), student_bucket=torch.tensor([0, 1, 1]),
                            teacher_ids=torch.tensor([1, 3]), teacher_bucket=torch.tensor([0, 1]), size=2)
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 5)
    log_p = torch.log_softmax(teacher / 2.0, -1)
    order = log_p.argsort(-1, descending=True)
    live = aligned_kl(student, teacher, vocab, 2.0)
    cached = aligned_topk_kl(student, log_p.gather(-1, order), order, vocab, 2.0)
    assert torch.allclose(live, cached, atol=1e-6)
    top2 = topk_bucket_probs(log_p.exp().gather(-1, order[:, :2]), order[:, :2], vocab)
    by_hand = [[row[1] * (1 in ids), row[3] * (3 in ids), 1 - row[1] * (1 in ids) - row[3] * (3 in ids)]
               for row, ids in zip(log_p.exp().tolist(), order[:, :2].tolist())]
    assert torch.allclose(top2, torch.tensor(by_hand), atol=1e-6)
    cached.sum().backward()
    assert student.grad.abs().sum() > 0


def test_a_student_with_its_own_tokenizer_learns_from_a_cache_of_the_teachers_tokenization(
        tmp_path, teacher_dir, student_tokenizer_dir, corpus, monkeypatch):
    build_from_config(CacheConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "cache"), data=corpus, k=8,
                                  samples=8, batch_size=8, shard_examples=32))
    monkeypatch.setattr(torch.nn.Module, "__call__", guard_teacher(torch.nn.Module.__call__))
    cfg = cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir, corpus,
                    [LossConfig(name="aligned_topk_kl"), LossConfig(name="next_token_ce")], cache=str(tmp_path / "cache"))
    distill_lm(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train_aligned_topk_kl", 0) > 0 for r in records)
    with pytest.raises(ConfigError, match="was built with another corpus_sha256"):
        distill_lm(cross_cfg(tmp_path, teacher_dir, student_tokenizer_dir,
                             CorpusConfig(source=corpus.source, max_length=6),
                             [LossConfig(name="aligned_topk_kl")], cache=str(tmp_path / "cache")))


def guard_teacher(call):
    """Module.__call__ that fails when a model with the teacher's 49,152-token vocabulary runs its forward."""
    def guarded(module, *args, **kwargs):
        config = getattr(module, "config", None)
        if getattr(config, "vocab_size", None) == 49152 and type(module).__name__.endswith("ForCausalLM"):
            raise AssertionError("the teacher ran")
        return call(module, *args, **kwargs)
    return guarded
