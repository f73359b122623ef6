"""Cross-tokenizer alignment and losses: word starts and aligned positions on hand-made offsets, the shared
vocabulary of the offline MiniLM (WordPiece, uncased) and SmolLM2 (byte-level BPE) tokenizers, bucketed
probabilities, aligned KL and ULD against values computed by hand."""
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill.core.models import load_tokenizer
from distill.lm.align import SharedVocab, aligned_positions, shared_vocabulary, token_surfaces, word_starts
from distill.losses.causal.cross_tokenizer import aligned_kl, bucket_log_probs, bucket_probs, uld_distance
from distill.losses.causal.divergences import forward_kl

TEXT = "unbelievable movie é!"  # "unbelievable" 0-11, " " 12, "movie" 13-17, " " 18, "é" 19, "!" 20
# byte-level-like: un|believ|able| movie, then " é" split into two byte tokens that share the character's span
STUDENT_OFFSETS = [(0, 2), (2, 8), (8, 12), (12, 18), (18, 20), (19, 20), (20, 21)]
# WordPiece-like with [CLS] and [SEP]: unbel|##ievable|movie|é|!
TEACHER_OFFSETS = [(0, 0), (0, 5), (5, 12), (13, 18), (19, 20), (20, 21), (0, 0)]


def test_word_starts_skip_special_and_whitespace_tokens_and_leading_spaces():
    offsets = [(0, 0), (0, 5), (5, 7), (5, 12), (7, 12), (12, 12)]
    assert word_starts("Hello  world", offsets) == [None, 0, None, 7, 7, None]
    assert word_starts(TEXT, STUDENT_OFFSETS) == [0, 2, 8, 13, 19, 19, 20]
    assert word_starts(TEXT, TEACHER_OFFSETS) == [None, 0, 5, 13, 19, 20, None]


def test_aligned_positions_pair_predictions_of_tokens_starting_at_one_character():
    student, teacher = word_starts(TEXT, STUDENT_OFFSETS), word_starts(TEXT, TEACHER_OFFSETS)
    # shared next-token starts: 13 ("movie"), 19 ("é": the student's first byte token), 20 ("!"). Char 0 is the
    # teacher's target after [CLS] but never the student's; 2, 5, 8 begin tokens of one side only.
    assert aligned_positions(student, teacher) == ([2, 3, 5], [2, 3, 4])
    assert aligned_positions(teacher, student) == ([2, 3, 4], [2, 3, 5])
    assert aligned_positions([0], [0]) == ([], [])


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer("offline:all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def smollm():
    return load_tokenizer("offline:SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def shared(bert, smollm):
    return shared_vocabulary(bert, smollm)


def buckets_of(ids: torch.Tensor, bucket: torch.Tensor, tokenizer, *tokens: str) -> list[int]:
    """The bucket of each token, -1 when it is not shared."""
    where = dict(zip(ids.tolist(), bucket.tolist()))
    return [where.get(tokenizer.convert_tokens_to_ids(token), -1) for token in tokens]


def test_token_surfaces_normalise_word_markers(bert, smollm):
    wordpiece, byte_level = token_surfaces(bert), token_surfaces(smollm)
    assert wordpiece[bert.convert_tokens_to_ids("##ing")] == (False, "ing")
    assert wordpiece[bert.convert_tokens_to_ids("the")] == (True, "the")
    assert not set(bert.all_special_ids) & wordpiece.keys()
    assert byte_level[smollm.convert_tokens_to_ids("Ġthe")] == (True, "the")
    assert byte_level[smollm.convert_tokens_to_ids("ĠcafÃ©")] == (True, "café")
    assert byte_level[smollm.convert_tokens_to_ids("ing")] == (False, "ing")
    assert smollm.convert_tokens_to_ids("Ġ") not in byte_level


@pytest.mark.parametrize("llama2_style", [False, True])
def test_token_surfaces_of_sentencepiece_tokenizers(llama2_style):
    """Metaspace, or Llama-2's normalizer replacing " " with "▁" and decoder undoing it; byte-fallback tokens and
    a lone "▁" are left out."""
    vocab = {"<unk>": 0, "▁the": 1, "the": 2, "▁": 3, "<0x41>": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    if llama2_style:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert token_surfaces(tokenizer) == {1: (True, "the"), 2: (False, "the")}


def test_shared_vocabulary_pairs_surfaces_not_continuations(bert, smollm, shared):
    student = buckets_of(shared.student_ids, shared.student_bucket, bert, "the", "##the", "##ing", "cafe", ",")
    teacher = buckets_of(shared.teacher_ids, shared.teacher_bucket, smollm, "Ġthe", "ĠThe", "the", "ing", "ĠcafÃ©",
                         ",", "Ġ,")
    the, the_continued, ing, cafe, comma = student
    assert -1 not in student + teacher
    assert teacher == [the, the, the_continued, ing, cafe, comma, comma]
    assert the != the_continued
    assert len(shared.student_ids.unique()) == len(shared.student_ids)
    assert len(shared.teacher_ids.unique()) == len(shared.teacher_ids)
    assert shared.student_bucket.unique().tolist() == shared.teacher_bucket.unique().tolist() == list(
        range(shared.size))
    assert len(shared.student_ids) / len(bert) > 0.3
    assert "shared buckets" in shared.summary()


def test_aligned_positions_of_real_tokenizers_start_next_tokens_at_one_character(bert, smollm):
    text = "The unbelievable movie, naïve café! It's 2024."
    student = bert(text, return_offsets_mapping=True)["offset_mapping"]  # with [CLS] and [SEP]
    teacher = smollm(text, return_offsets_mapping=True)["offset_mapping"]
    s, t = aligned_positions(word_starts(text, student), word_starts(text, teacher))
    chars = []
    for i, j in zip(s, t):
        (ss, se), (ts, te) = student[i + 1], teacher[j + 1]
        a, b = text[ss:se].lstrip(), text[ts:te].lstrip()
        assert se - len(a) == te - len(b)
        assert a.startswith(b) or b.startswith(a)
        chars.append(se - len(a))
    # not aligned: SmolLM2's "vable" (11), "ïve" (26), "2", "4" at 42, 43 and BERT's "s" (39) split words alone
    assert chars == [text.index(w) for w in ("unbel", "movie", ",", "naïve", "café", "!", "It", "'", "2024", "4.",
                                             ".")]


# a 5-token student and a 3-token teacher; shared buckets: student 0 | teacher 0 and student 1, 2 | teacher 1
VOCAB = SharedVocab(student_ids=torch.tensor([0, 1, 2]), student_bucket=torch.tensor([0, 1, 1]),
                    teacher_ids=torch.tensor([0, 1]), teacher_bucket=torch.tensor([0, 1]), size=2,
                    student_vocab_size=5, teacher_vocab_size=3)


def test_bucket_probs_sum_many_to_one_buckets_and_the_rest():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    expected = torch.tensor([[0.1, 0.5, 0.4]])
    assert torch.allclose(bucket_probs(probs, VOCAB.student_ids, VOCAB.student_bucket, 2), expected, atol=1e-7)
    log = bucket_log_probs(probs.log(), VOCAB.student_ids, VOCAB.student_bucket, 2)
    assert torch.allclose(log, expected.log(), atol=1e-6)
    ids, bucket = torch.tensor([1, 3, 0]), torch.tensor([0, 0, 1])
    expected = torch.tensor([[0.35, 0.1, 0.55]])
    assert torch.allclose(bucket_probs(probs, ids, bucket, 2), expected, atol=1e-7)


def hand_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def softened(probs: list[float], temperature: float) -> list[float]:
    powered = [x ** (1 / temperature) for x in probs]
    return [x / sum(powered) for x in powered]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_aligned_kl_hand_values(temperature):
    student_probs, teacher_probs = [0.1, 0.2, 0.3, 0.15, 0.25], [0.5, 0.3, 0.2]
    student = torch.tensor([student_probs]).log().requires_grad_()
    teacher = torch.tensor([teacher_probs]).log()
    s, t = softened(student_probs, temperature), softened(teacher_probs, temperature)
    q, p = [s[0], s[1] + s[2], s[3] + s[4]], t
    value = aligned_kl(student, teacher, VOCAB, temperature)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(hand_kl(p, q), abs=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_aligned_kl_is_zero_for_equal_bucketed_distributions():
    student = torch.tensor([[0.5, 0.1, 0.2, 0.15, 0.05]]).log()  # buckets 0.5, 0.3, 0.2
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert aligned_kl(student, teacher, VOCAB, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_aligned_kl_on_one_vocabulary_is_forward_kl_with_finite_gradient():
    """Every token shared one to one: both rest buckets are empty."""
    identity = SharedVocab(torch.arange(4), torch.arange(4), torch.arange(4), torch.arange(4), 4, 4, 4)
    student, teacher = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(), torch.randn(3, 4)
    value = aligned_kl(student, teacher, identity, 2.0)
    assert torch.allclose(value, forward_kl(student, teacher, 2.0), atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_uld_distance_hand_values_and_permutation_invariance():
    student = torch.tensor([[0.2, 0.5, 0.3]]).log().requires_grad_()
    teacher = torch.tensor([[0.1, 0.4, 0.3, 0.2]]).log()
    # sorted: 0.5 0.3 0.2 0 against 0.4 0.3 0.2 0.1
    value = uld_distance(student, teacher, 1.0)
    assert value.item() == pytest.approx(0.2, abs=1e-6)
    assert uld_distance(student, teacher, 1.0, top=2).item() == pytest.approx(0.1, abs=1e-6)
    s, t = softened([0.2, 0.5, 0.3], 2.0), sorted(softened([0.1, 0.4, 0.3, 0.2], 2.0), reverse=True)
    expected = sum(abs(a - b) for a, b in zip(sorted(s, reverse=True) + [0.0], t))
    assert uld_distance(student, teacher, 2.0).item() == pytest.approx(expected, abs=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(uld_distance(logits[:, [3, 0, 5, 1, 4, 2]], logits, 1.5), torch.zeros(2), atol=1e-6)
