"""The scalar heads (reward model, PPO value) on the GPT-2 trunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import heads
from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError, InputError
from jaxgpt.model import forward, hidden_states
from jaxgpt.params import check_params, count_params, init_params, param_table

CONFIG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def lm_params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens_BT():
    return jax.random.randint(jax.random.key(1), (3, 9), 0, CONFIG.vocab_size)


def test_hidden_states_are_what_the_output_layer_reads(lm_params, tokens_BT):
    logits_BTV, captured = forward(lm_params, tokens_BT, CONFIG, capture=True)
    h_BTD = hidden_states(lm_params, tokens_BT, CONFIG)
    np.testing.assert_allclose(h_BTD, captured["ln_f"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_BTD @ lm_params["wte"].T, logits_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head, name", [("reward", "score_head"), ("lm+value", "value_head")])
def test_init_params_adds_the_scalar_head(head, name):
    config = CONFIG.replace(head=head)
    params = init_params(config, jax.random.key(0))
    check_params(params, config)
    assert params[name]["kernel"].shape == (CONFIG.n_embd, 1)
    assert params[name]["bias"].shape == (1,)
    assert count_params(config) == count_params(CONFIG) + CONFIG.n_embd + 1
    assert param_table(config)[-2][0].startswith(name)
    with pytest.raises(InputError, match="unexpected"):
        check_params(params, CONFIG)  # an lm config does not take a head


def test_unknown_head_is_refused():
    with pytest.raises(ConfigError, match="GPTConfig.head"):
        CONFIG.replace(head="critic")


def test_sequence_scores_read_the_head_at_the_last_answer_token(lm_params, tokens_BT):
    config, params = heads.with_head(CONFIG, lm_params, "reward", jax.random.key(2))
    mask_BT = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1], [0] * 9])
    last_B = heads.last_index(mask_BT)
    np.testing.assert_array_equal(last_B, [4, 8, 0])
    got_B = heads.sequence_scores(params, tokens_BT, last_B, config)
    # By hand: the trunk's final-LayerNorm vector at that token, times the head, plus the bias.
    h_BTD = np.asarray(hidden_states(lm_params, tokens_BT, CONFIG))
    w_D1, b_1 = np.asarray(params["score_head"]["kernel"]), np.asarray(params["score_head"]["bias"])
    want_B = np.array([h_BTD[b, t] @ w_D1[:, 0] + b_1[0] for b, t in enumerate([4, 8, 0])])
    np.testing.assert_allclose(got_B, want_B, rtol=1e-5, atol=1e-6)


def test_logits_and_values_share_one_pass(lm_params, tokens_BT):
    config, params = heads.with_head(CONFIG, lm_params, "lm+value", jax.random.key(3))
    logits_BTV, values_BT = heads.logits_and_values(params, tokens_BT, config)
    np.testing.assert_allclose(logits_BTV, forward(lm_params, tokens_BT, CONFIG), atol=1e-5)
    h_BTD = hidden_states(lm_params, tokens_BT, CONFIG)
    head = params["value_head"]
    want_BT = (h_BTD @ head["kernel"])[..., 0] + head["bias"][0]
    np.testing.assert_allclose(values_BT, want_BT, rtol=1e-5, atol=1e-6)


def test_with_head_keeps_the_trunk_and_refuses_a_reward_trunk_as_policy(lm_params):
    config, params = heads.with_head(CONFIG, lm_params, "reward", jax.random.key(4))
    assert config.head == "reward"
    for name in ("wte", "wpe", "ln_f", "blocks"):
        assert params[name] is lm_params[name]  # shared, not copied
    with pytest.raises(ConfigError, match="reward model; it cannot start a language model"):
        heads.with_head(config, params, "lm", jax.random.key(5))
    value_config, value_params = heads.with_head(CONFIG, lm_params, "lm+value", jax.random.key(6))
    back_config, back = heads.with_head(value_config, value_params, "lm", jax.random.key(7))
    assert back_config == CONFIG and set(back) == set(lm_params)
    with pytest.raises(InputError, match="needs a reward model, but the model is a language"):
        heads.scores(lm_params, jnp.zeros((1, 4), jnp.int32), CONFIG)
