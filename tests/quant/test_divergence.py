"""The KL-divergence figures against hand-computed values."""
import math

import numpy as np
import pytest

from quant.measure.divergence import divergence_summary, token_divergences


def test_kl_and_top1_per_position():
    reference = np.array([[0.0, math.log(3.0)], [2.0, 0.0]])  # p = (1/4, 3/4), then top-1 token 0
    model = np.array([[1.0, 1.0], [5.0, 1.0]])  # q = (1/2, 1/2), then top-1 token 0
    kl, same = token_divergences(reference, model)
    q2 = np.exp([5.0, 1.0]) / np.exp([5.0, 1.0]).sum()
    p2 = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    assert kl[0] == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert kl[1] == pytest.approx(float((p2 * np.log(p2 / q2)).sum()))
    assert same.tolist() == [False, True]  # a tie's first token is the top-1, as argmax takes it


def test_the_summary_is_over_every_position_of_every_text():
    kls = [np.arange(100, dtype=float), np.array([1000.0])]
    summary = divergence_summary(kls, [np.ones(100, bool), np.zeros(1, bool)])
    assert summary["kld_mean"] == pytest.approx((99 * 100 / 2 + 1000) / 101)
    assert summary["kld_p99"] == pytest.approx(np.percentile(np.r_[np.arange(100), 1000], 99))
    assert summary["same_top1"] == pytest.approx(100 / 101)
