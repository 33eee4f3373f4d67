import pytest

from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.errors import ConfigError
from jaxgpt.params import count_params, param_table


@pytest.mark.parametrize(
    "preset,total",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(preset, total):
    assert count_params(get_preset(preset)) == total


def test_param_table_components_add_up():
    for name in PRESETS:
        rows = param_table(PRESETS[name])
        assert rows[-1][0] == "total"
        assert sum(r[2] for r in rows[:-1]) == rows[-1][2]


def test_gpt2_table_rows():
    rows = {name.split(" (")[0]: count for name, _, count in param_table(get_preset("gpt2"))}
    assert rows["token embedding"] == 50257 * 768
    assert rows["position embedding"] == 1024 * 768
    assert rows["total"] == 124_439_808


@pytest.mark.parametrize(
    "fields,field_name",
    [
        (dict(n_embd=100, n_head=3), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(block_size=1.5), "block_size"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(dtype="float64"), "dtype"),
        (dict(attention="flash9"), "attention"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
    ],
)
def test_config_validation_names_the_field(fields, field_name):
    with pytest.raises(ConfigError, match=field_name):
        GPTConfig(**fields)


def test_replace_and_unknown_fields():
    config = get_preset("tiny", n_layer=3)
    assert config.n_layer == 3 and config.head_dim == 16
    with pytest.raises(ConfigError, match="did you mean 'n_head'"):
        config.replace(n_heads=4)
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        get_preset("gtp2")
    assert GPTConfig.from_dict(config.to_dict()) == config
