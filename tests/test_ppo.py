"""PPO's pieces against examples worked by hand (numbers in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxgpt.objectives import clipped_policy_loss, clipped_value_loss
from jaxgpt.ppo import adaptive_beta, gae, kl_penalized_rewards, whiten


def test_gae_worked_example():
    # Row 0, all three tokens valid, γ = 1, λ = 0.9:
    #   δ = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]
    #   A2 = 0.3, A1 = 0.1 + 0.9·0.3 = 0.37, A0 = 0.1 + 0.9·0.37 = 0.433; R = A + V.
    # Row 1, last slot padding (its reward and value must not leak in):
    #   δ1 = 2 - 1 = 1 (no V after the end), δ0 = 0 + 1 - 1 = 0; A1 = 1, A0 = 0.9.
    rewards = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]], np.float32)
    values = np.array([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    np.testing.assert_allclose(adv, [[0.433, 0.37, 0.3], [0.9, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.933, 0.97, 1.0], [1.9, 2.0, 0.0]], atol=1e-6)


def test_gae_with_discount():
    # One token: A = r - V. Two tokens, γ = 0.5, λ = 1: δ = [0 + 0.5·2 - 1, 4 - 2] = [0, 2];
    # A1 = 2, A0 = 0 + 0.5·2 = 1.
    adv, _ = gae(np.array([[0.0, 4.0]]), np.array([[1.0, 2.0]]), np.ones((1, 2)), 0.5, 1.0)
    np.testing.assert_allclose(adv, [[1.0, 2.0]], atol=1e-6)


def test_kl_penalized_rewards_worked_example():
    # log π - log π_ref = [0.5, -1.0, 0.0]; β = 0.1 → [-0.05, +0.1, 0]; score 1 on the last token.
    rewards, kl = kl_penalized_rewards(
        np.array([1.0]), np.array([[-1.0, -2.0, -0.5, -3.0]]), np.array([[-1.5, -1.0, -0.5, 0.0]]),
        np.array([[1, 1, 1, 0]]), beta=0.1,
    )  # fmt: skip
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(kl, [-0.5], atol=1e-6)


def test_clipped_policy_loss_worked_example():
    # ratios 1.5 and 0.5, advantages +1 and -1, ε = 0.2:
    #   min(1.5·1, 1.2·1) = 1.2;  min(0.5·(-1), 0.8·(-1)) = -0.8;  loss = -(1.2 - 0.8) / 2 = -0.2
    # both ratios are outside [0.8, 1.2]: clip fraction 1. A masked third token changes nothing.
    logp = np.log(np.array([[1.5, 0.5, 7.0]], np.float32))
    loss, frac = clipped_policy_loss(logp, np.zeros((1, 3)), np.array([[1.0, -1.0, 5.0]]),
                                     np.array([[1, 1, 0]]), clip_eps=0.2)  # fmt: skip
    assert float(loss) == pytest.approx(-0.2, abs=1e-6)
    assert float(frac) == pytest.approx(1.0)
    # Inside the trust region the loss is the plain -ρA: ratio 1.1, A = 2 → -2.2.
    loss, frac = clipped_policy_loss(np.log([[1.1]]), np.zeros((1, 1)), np.array([[2.0]]),
                                     np.ones((1, 1)), clip_eps=0.2)  # fmt: skip
    assert float(loss) == pytest.approx(-2.2, abs=1e-5) and float(frac) == 0.0


def test_clipped_value_loss_worked_example():
    # V = 3, V_old = 1, R = 2, ε = 0.5: (3-2)² = 1; clipped V = 1.5, (1.5-2)² = 0.25 → ½·max = 0.5
    loss = clipped_value_loss(np.array([[3.0]]), np.array([[1.0]]), np.array([[2.0]]),
                              np.ones((1, 1)), clip_eps=0.5)  # fmt: skip
    assert float(loss) == pytest.approx(0.5)


def test_whiten_and_adaptive_beta():
    x = np.array([[1.0, 2.0, 3.0, 100.0]])
    w = np.asarray(whiten(x, np.array([[1, 1, 1, 0]])))
    np.testing.assert_allclose(w[0, :3], np.array([-1, 0, 1]) / math.sqrt(2 / 3), atol=1e-5)
    assert w[0, 3] == 0.0
    # KL 8 vs target 6: error clipped to +0.2 → β · (1 + 0.2 · 256 / 10000)
    assert float(adaptive_beta(0.1, 8.0, 6.0, 10_000, 256)) == pytest.approx(0.100512, rel=1e-6)
    assert float(adaptive_beta(0.1, 3.0, 6.0, 10_000, 256)) == pytest.approx(
        0.1 * (1 - 0.2 * 0.0256)
    )
