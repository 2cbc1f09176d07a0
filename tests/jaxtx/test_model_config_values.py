"""Every numeric ModelConfig field has a domain, NaN/inf never pass, and every YAML or value error from `jaxtx info`
is one line naming the field or file:line:column."""
import dataclasses
import typing

import pytest

from jaxtx import cli
from jaxtx.config import (MODEL_DOMAINS, ConfigError, ModelConfig, load_model_config, load_yaml, parse_overrides,
                          parse_value)
from jaxtx.sharding import load_mesh_config


def _numeric_fields():
    out = {}
    for f in dataclasses.fields(ModelConfig):
        tp = typing.get_type_hints(ModelConfig)[f.name]
        base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if base in (int, float):
            out[f.name] = base
    return out


def test_every_numeric_field_has_a_domain():
    """A new numeric field must state its domain here, or it would accept NaN and negative values unchecked."""
    assert set(_numeric_fields()) == set(MODEL_DOMAINS)


def _outside(bounds, kind):
    if "gt" in bounds:
        return kind(bounds["gt"])
    if "ge" in bounds:
        return kind(bounds["ge"] - 1) if kind is int else bounds["ge"] - 1e-3
    raise AssertionError(bounds)


@pytest.mark.parametrize("name", sorted(MODEL_DOMAINS))
def test_out_of_domain_values_are_refused(name):
    kind = _numeric_fields()[name]
    bounds = MODEL_DOMAINS[name]
    bad = [_outside(bounds, kind)]
    if kind is float:
        bad += [float("nan"), float("inf"), float("-inf")]
    if "lt" in bounds:
        bad.append(kind(bounds["lt"]))
    for v in bad:
        with pytest.raises(ConfigError, match=rf"ModelConfig\.{name}={v!r}: must be"):
            ModelConfig(**{name: v})


@pytest.mark.parametrize("override,pattern", [
    ("norm_eps=nan", r"ModelConfig.norm_eps=nan: must be a finite number > 0"),
    ("rope_theta=-5", r"ModelConfig.rope_theta=-5.0: must be > 1"),
    ("rope_theta=inf", r"rope_theta=inf: must be a finite number"),
    ("dropout=-0.1", r"dropout=-0.1: must be in \[0, 1\)"),
    ("softmax_scale=-1", r"softmax_scale=-1.0: must be > 0 \(or null"),
    ("router_aux_loss_coef=-0.01", r"router_aux_loss_coef=-0.01: must be >= 0"),
    ("rope_factor=0", r"rope_factor=0.0: must be > 0"),
    ("rope_scaling=llama3 rope_factor=8 rope_low_freq_factor=4", r"rope_high_freq_factor=4.0: must be > "
                                                                  r"rope_low_freq_factor=4.0"),
    ("rope_scaling=yarn rope_factor=4 yarn_beta_fast=1", r"yarn_beta_fast=1.0: must be > yarn_beta_slow=1.0"),
    ("position=t5 t5_max_distance=8 t5_num_buckets=32", r"t5_max_distance=8: must be > t5_num_buckets // 2 = 16"),
])
def test_decoder_domain_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_model_config("tiny", override.split())


def test_cross_field_rules_that_made_nan_frequencies():
    """Before: llama3 with equal low/high factors divided 0 by 0 (NaN inverse frequencies); a T5 encoder with 2
    buckets took log(n / 0). Now both are refused, and the shipped values still load."""
    from jaxtx.layers.positions import rope_inv_freq
    ok = load_model_config("llama3-8b", ["rope_scaling=llama3", "rope_factor=8"])
    inv, _ = rope_inv_freq(ok)
    assert all(x == x for x in inv)  # finite
    with pytest.raises(ConfigError, match=r"t5_num_buckets=2: must be >= 4 \(kind='encoder_decoder'\)"):
        load_model_config("t5-small", ["t5_num_buckets=2"])
    assert load_model_config("t5-small", ["t5_num_buckets=4", "t5_max_distance=3"]).t5_num_buckets == 4


def test_override_values_parse_like_yaml_and_nan_is_a_number():
    assert parse_value("1e-4") == 1e-4 and parse_value("3") == 3 and parse_value("null") is None
    assert parse_value("nan") != parse_value("nan")  # NaN: reaches the range check, which refuses it
    assert parse_value("[1, 2") == "[1, 2"  # not YAML: kept as typed (a str field takes it, others refuse it)
    assert parse_overrides(["a=1", " b = x ", "c=d=e"], "k=v") == [("a", 1), ("b", "x"), ("c", "d=e")]
    with pytest.raises(ConfigError, match="expected the form k=v"):
        parse_overrides(["nokey"], "k=v")


# ------------------------------------------------------------------------------------------------ YAML files
@pytest.mark.parametrize("text,pattern", [
    ("d_model: 64\nn_heads: [4\n", r"m.yaml:3:1: invalid YAML: expected ',' or ']'"),
    ("d_model: 64\n  n_heads: 4\n", r"m.yaml:2:10: invalid YAML: mapping values are not allowed here"),
    ("d_model: 64\nd_model: 32\n", r"m.yaml:2:1: invalid YAML: key 'd_model' appears twice \(first on line 1\)"),
    ("\tn_heads: 4\n", r"m.yaml:1:1: invalid YAML"),
    ("- 1\n- 2\n", r"m.yaml: expected a mapping of model preset keys, got list"),
])
def test_model_yaml_errors_name_file_line_column(tmp_path, text, pattern):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_model_config(str(p))


def test_yaml_exponent_floats_and_non_utf8(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("norm_eps: 1e-5\nrope_theta: 5E+5\nname: 1e3x\n")
    cfg = load_model_config(str(p))
    assert cfg.norm_eps == 1e-5 and cfg.rope_theta == 5e5 and cfg.name == "1e3x"
    p.write_text("base: &b {d_model: 64, n_heads: 4}\nm:\n  <<: *b\n  n_heads: 8\n")  # a merge then an override
    assert load_yaml(p)["m"] == {"d_model": 64, "n_heads": 8}  # is not a duplicate key
    p.write_bytes(b"d_model: 64\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"m.yaml: not UTF-8 text \(invalid byte at offset 21\)"):
        load_yaml(p)
    with pytest.raises(ConfigError, match=r"model preset '.*nope.yaml': no such file"):
        load_model_config(str(tmp_path / "nope.yaml"))


def test_mesh_loader_shares_the_yaml_errors(tmp_path):
    p = tmp_path / "mesh.yaml"
    p.write_text("data: 2\nfsdp: 4\nfsdp: 2\n")
    with pytest.raises(ConfigError, match=r"mesh.yaml:3:1: invalid YAML: key 'fsdp' appears twice"):
        load_mesh_config(str(p))
    p.write_text("data: 2\nfsdp: 4\n")
    assert load_mesh_config(str(p), ["fsdp=2"]).fsdp == 2
    with pytest.raises(ConfigError, match=r"mesh preset 'fsdb' not found: .*did you mean 'fsdp'\?"):
        load_mesh_config("fsdb")
    with pytest.raises(ConfigError, match="expected the form axis=value"):
        load_mesh_config("fsdp", ["fsdp"])


# ------------------------------------------------------------------------------------------------ jaxtx info
@pytest.mark.parametrize("args,expect", [
    (["tiny", "norm_eps=nan"], "ModelConfig.norm_eps=nan: must be a finite number > 0"),
    (["tiny", "rope_theta=-5"], "ModelConfig.rope_theta=-5.0: must be > 1"),
    (["tiny", "dropout=nan"], "ModelConfig.dropout=nan"),
    (["{tmp}/bad.yaml"], "bad.yaml:2:10: invalid YAML"),
    (["{tmp}/missing.yaml"], "missing.yaml': no such file"),
])
def test_info_cli_refuses_with_one_line(args, expect, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("d_model: 64\n  n_heads: 4\n")
    rc = cli.main(["info", *[a.format(tmp=tmp_path) for a in args]])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and expect in err, err
