"""Config validation: every bad value is refused with a message naming the field, the value and the rule."""
import pytest
import yaml

from jaxtx.config import ConfigError, ModelConfig, apply_overrides, load_model_config, preset_names


@pytest.mark.parametrize("override,pattern", [
    ("n_kv_heads=3", r"n_heads=8 is not divisible by n_kv_heads=3"),
    ("d_model=250", r"d_model=250 is not divisible by n_heads=8"),
    ("activation=swish", r"activation='swish': expected one of \['relu', 'gelu', 'gelu_tanh', 'silu'\]"),
    ("window=0", r"window=0: must be >= 1"),
    ("d_ff=-4", r"d_ff=-4: must be >= 1"),
    ("n_layers=2.5", r"n_layers=2.5: expected int, got float"),
    ("tie_embeddings=maybe", r"tie_embeddings='maybe': expected bool"),
    ("norm=batchnorm", r"norm='batchnorm'"),
    ("n_haeds=4", r"unknown key 'n_haeds'; did you mean 'n_heads'\?"),
    ("nlayers", r"expected the form field=value"),
    ("position=rope", None),
])
def test_override_errors_name_field_value_rule(override, pattern):
    if pattern is None:
        assert load_model_config("tiny", [override]).position == "rope"
        return
    with pytest.raises(ConfigError, match=pattern):
        load_model_config("tiny", [override])


def test_moe_rules():
    with pytest.raises(ConfigError, match=r"experts_per_token=3: must be in \[1, num_experts=2\]"):
        load_model_config("mixtral-8x7b", ["num_experts=2", "experts_per_token=3"])
    with pytest.raises(ConfigError, match=r"capacity_factor=0.0"):
        load_model_config("mixtral-8x7b", ["capacity_factor=0"])


def test_overrides_are_typed():
    cfg = load_model_config("tiny", ["rope_theta=500000", "norm_eps=1e-6", "window=null", "dropout=0.1"])
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    assert cfg.norm_eps == 1e-6 and cfg.window is None and cfg.dropout == 0.1
    assert apply_overrides(cfg, {"n_layers": 2}).n_layers == 2


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"d_model": 64, "n_heads": 4, "vocab_sise": 100}))
    with pytest.raises(ConfigError, match=r"unknown key 'vocab_sise'; did you mean 'vocab_size'\?"):
        load_model_config(str(p))


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'llama3-8b'\?"):
        load_model_config("llama3-8")


def test_presets_parse_and_are_frozen():
    names = preset_names()
    for required in ["tiny", "gpt2", "gpt2-medium", "llama3-8b", "llama3-70b", "mistral-7b", "mixtral-8x7b",
                     "bert-base", "t5-small", "t5-v1_1-base"]:
        assert required in names
    for n in names:
        cfg = load_model_config(n)
        assert isinstance(cfg, ModelConfig) and cfg.name == n
    with pytest.raises(Exception):
        cfg.d_model = 3
