"""Draft acceptance (`distill.lm.acceptance`): the greedy replay against hand-counted loops and against speculative
decoding run for real (draft proposals made autoregressively, the target's check in one pass); the sampled rule's
acceptance rate against its definition."""
import copy

import pytest
import torch

from distill.lm.acceptance import acceptance, expected_tokens_per_pass, greedy_continuation, greedy_tokens_per_pass
from tests.helpers.families import tiny_family_model

T, F = True, False


@pytest.mark.parametrize("row, k, expected", [
    ([T, T, F, T, T, T], 2, 6 / 2),  # passes: 3 tokens (2 accepted + 1), 3 tokens
    ([T, T, F, T, T, T], 1, 6 / 4),  # 2, 1, 2, 1 (the last pass can only make the one token left)
    ([F, F, F, F], 3, 1.0),  # every pass makes the target's own token alone
    ([T, T, T, T, T, T], 2, 3.0),  # k + 1 per pass
])
def test_greedy_replay_counts_tokens_per_target_pass(row, k, expected):
    assert greedy_tokens_per_pass([row], k) == pytest.approx(expected)


def test_expected_tokens_follow_the_geometric_series():
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.0, 4) == 1.0


@torch.inference_mode()
def speculative_greedy(target, draft, prompt, new_tokens, k):
    """Speculative decoding, greedy, written out: (the tokens it makes, target passes)."""
    ids, passes = list(prompt), 0
    while len(ids) - len(prompt) < new_tokens:
        proposal = []
        for _ in range(k):
            proposal.append(int(draft(torch.tensor([ids + proposal])).logits[0, -1].argmax()))
        checks = target(torch.tensor([ids + proposal])).logits[0, len(ids) - 1:].argmax(-1).tolist()
        accepted = 0
        while accepted < k and proposal[accepted] == checks[accepted]:
            accepted += 1
        ids += (proposal[:accepted] + [checks[accepted]])[:new_tokens - (len(ids) - len(prompt))]
        passes += 1
    return ids[len(prompt):], passes


@pytest.fixture(scope="module")
def pair():
    """A target and a draft that agrees with it often but not always (the target with its last layer's FFN
    perturbed)."""
    target = tiny_family_model("llama", seed=0, initializer_range=0.3)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        torch.manual_seed(1)
        mlp = draft.model.layers[-1].mlp.down_proj.weight
        mlp.add_(torch.randn_like(mlp) * 0.6)
    return target, draft


def test_greedy_replay_equals_speculative_decoding_run_for_real(pair):
    target, draft = pair
    prompts, new_tokens = [[5, 9, 14, 3], [8, 8, 31], [40, 2, 17, 17, 6]], 12
    metrics = acceptance(target, draft, prompts, new_tokens, ks=[1, 2, 4])
    assert 0.2 < metrics["greedy_match"] < 0.95  # the pair disagrees sometimes: the counts are not trivial
    for k in (1, 2, 4):
        runs = [speculative_greedy(target, draft, prompt, new_tokens, k) for prompt in prompts]
        for prompt, (tokens, _) in zip(prompts, runs):
            assert tokens == greedy_continuation(target, prompt, new_tokens)  # lossless: the target's own output
        made, passes = sum(len(tokens) for tokens, _ in runs), sum(p for _, p in runs)
        assert metrics["per_k"][k]["greedy_tokens_per_pass"] == pytest.approx(made / passes)


def test_the_acceptance_rate_is_the_mean_overlap_of_the_two_distributions(pair):
    target, draft = pair
    prompt, new_tokens = [5, 9, 14, 3], 6
    metrics = acceptance(target, draft, [prompt], new_tokens, ks=[3])
    ids = torch.tensor([prompt + greedy_continuation(target, prompt, new_tokens)])
    with torch.no_grad():
        p = torch.softmax(target(ids).logits[0, 3:-1], -1)
        q = torch.softmax(draft(ids).logits[0, 3:-1], -1)
    overlap = 1 - 0.5 * (p - q).abs().sum(-1)  # 1 - total variation
    assert metrics["alpha"] == pytest.approx(float(overlap.mean()), rel=1e-5)
    assert metrics["per_k"][3]["sampled_tokens_per_pass"] == pytest.approx(
        expected_tokens_per_pass(metrics["alpha"], 3))
    assert acceptance(target, target, [prompt], new_tokens, ks=[3])["alpha"] == pytest.approx(1.0)
