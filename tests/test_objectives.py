"""The small pure losses in jaxgpt.objectives, against NumPy on hand-made examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.objectives import dpo_loss, masked_mean, masked_next_token_loss, pairwise_reward_loss

# Two rows of three positions over a 4-token vocabulary.
LOGITS = np.array(
    [
        [[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, -2.0]],
        [[-1.0, 4.0, 0.0, 0.0], [0.5, 0.5, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]],
    ],
    np.float32,
)
TARGETS = np.array([[0, 2, 1], [3, 2, -1]], np.int32)  # -1: padding, never trained
MASK = np.array([[1, 0, 1], [0, 1, 0]], np.int32)


def numpy_nll(logits_V: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target], in float64."""
    z = logits_V.astype(np.float64)
    return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[target])


def test_masked_loss_is_the_mean_over_trained_positions_only():
    loss, count = masked_next_token_loss(jnp.asarray(LOGITS), TARGETS, MASK)
    trained = [(0, 0), (0, 2), (1, 1)]
    expected = np.mean([numpy_nll(LOGITS[b, t], TARGETS[b, t]) for b, t in trained])
    assert int(count) == 3 and count.dtype == jnp.int32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # e.g. position (0, 2): log(e + e^3 + 1 + e^-2) - 3, worked by hand.
    assert abs(numpy_nll(LOGITS[0, 2], 1) - (np.log(np.e + np.e**3 + 1 + np.e**-2) - 3)) < 1e-12


def test_masked_loss_ignores_untrained_positions_entirely():
    """Changing untrained logits or targets changes nothing, and their gradient is zero."""
    loss_fn = lambda logits: masked_next_token_loss(logits, TARGETS, MASK)[0]
    changed = LOGITS.copy()
    changed[0, 1] = [9.0, -9.0, 3.0, 1.0]
    assert float(loss_fn(jnp.asarray(changed))) == float(loss_fn(jnp.asarray(LOGITS)))
    grads = np.asarray(jax.grad(loss_fn)(jnp.asarray(LOGITS)))
    assert np.all(grads[MASK == 0] == 0) and np.all(np.abs(grads[MASK == 1]).sum(-1) > 0)


def test_masked_loss_with_nothing_trained_is_zero_not_nan():
    loss, count = masked_next_token_loss(jnp.asarray(LOGITS), TARGETS, np.zeros_like(MASK))
    assert int(count) == 0 and float(loss) == 0.0


def test_all_ones_mask_equals_the_plain_next_token_loss():
    targets = np.maximum(TARGETS, 0)
    loss, count = masked_next_token_loss(jnp.asarray(LOGITS), targets, np.ones_like(MASK))
    plain = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(LOGITS), targets).mean()
    expected = np.mean([numpy_nll(LOGITS[b, t], targets[b, t]) for b in range(2) for t in range(3)])
    assert int(count) == 6
    np.testing.assert_allclose([float(loss), float(plain)], [expected, expected], rtol=1e-6)


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
