"""The pure losses: masked mean, pairwise reward loss and DPO against independent NumPy code."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgpt.objectives import dpo_loss, masked_mean, pairwise_reward_loss


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_masked_mean_counts_only_weighted_entries():
    loss, count = masked_mean(np.array([[1.0, 2.0, 30.0]]), np.array([[1, 1, 0]]))
    assert float(loss) == pytest.approx(1.5) and float(count) == 2
    loss, count = masked_mean(np.array([[5.0]]), np.array([[0]]))
    assert float(loss) == 0.0 and float(count) == 0


def test_pairwise_reward_loss_matches_numpy():
    rc = np.array([2.0, 0.5, -1.0, 3.0], np.float32)
    rr = np.array([1.0, 0.5, 0.0, -2.0], np.float32)
    loss, acc = pairwise_reward_loss(rc, rr)
    assert float(loss) == pytest.approx(-np_log_sigmoid(rc - rr).mean(), rel=1e-6)
    assert float(acc) == pytest.approx(0.5)  # the tie counts as wrong


def test_dpo_loss_matches_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
    beta = 0.1
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta)
    logits = beta * ((pc - rc) - (pr - rr))
    assert float(loss) == pytest.approx(float(-np_log_sigmoid(logits).mean()), rel=1e-5)
    assert float(metrics["reward_accuracy"]) == pytest.approx(float((logits > 0).mean()))
    assert float(metrics["reward_margin"]) == pytest.approx(float(logits.mean()), rel=1e-5)
    # At the reference policy every implicit reward is 0: the loss is log 2.
    loss, _ = dpo_loss(rc, rr, rc, rr, beta)
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
