"""Generation quality beside perplexity (`distill.lm.metrics`): which completions loop, on hand-made word lists both
ways, the scores of a set of completions, and the openings of plain texts that serve as prompts."""
import pytest

from distill.lm.data import text_prompts
from distill.lm.metrics import generation_scores, loops


def words(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize("text", [
    "The story of the world is a story of the world is a story of",
    "I liked it . I liked it . I liked it .",
    "the the the the the the the the",
    "it was a good film and it is a and it is a and it is a",
])
def test_a_span_repeated_back_to_back_loops(text):
    assert loops(words(text))


@pytest.mark.parametrize("text", [
    "This movie was one of the best films I have seen this year , and the acting was great .",
    "one of the best films , truly one of the best films , and one of the best casts",  # a phrase used apart
    "it was very very very good and so so funny",  # short words doubled
    "a b c a b c",  # a three-token cycle, gone round twice: shorter than the span
    "",
])
def test_prose_that_repeats_words_or_phrases_does_not_loop(text):
    assert not loops(words(text))


def test_a_short_cycle_loops_once_its_multiple_of_four_tokens_repeats():
    assert not loops(words("a b c a b c a b c a b"))  # period 3: its multiple of 6 tokens not yet twice
    assert loops(words("a b c a b c a b c a b c"))


def test_the_scores_of_a_set_of_completions():
    completions = [[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7], [8, 9, 8, 9, 8, 9, 8, 9], [1, 2]]
    scores = generation_scores(completions)
    assert scores["loop_share"] == 2 / 4
    assert scores["completion_tokens"] == (8 + 3 + 8 + 2) / 4
    # bigrams: (1,2) (2,3) (3,4) (4,1) x, (5,6) (6,7), (8,9) (9,8) x, (1,2) again: 8 distinct of 7 + 2 + 7 + 1
    assert scores["completion_distinct_2"] == 8 / 17


def test_plain_texts_are_cut_to_their_openings_leaving_a_token_to_continue():
    assert text_prompts([list(range(10)), [1, 2, 3], [7]], tokens=4) == [[0, 1, 2, 3], [1, 2], [7]]
