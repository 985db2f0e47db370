import pytest
import yaml

from saelab.cli import compose_params, main as cli_main
from saelab.core.config import ConfigError, load_params, parse_params, to_dict


def test_defaults_validate():
    p = parse_params({})
    assert p.extract.layer == 8 and p.sae.architecture == "jumprelu"


@pytest.mark.parametrize("raw, key", [
    ({"sae": {"d_sae": 0}}, "sae.d_sae"),
    ({"sae": {"lr": -1.0}}, "sae.lr"),
    ({"sae": {"lr": "fast"}}, "sae.lr"),
    ({"sae": {"architecture": "relu"}}, "sae.architecture"),
    ({"extract": {"hook": "attn_out"}}, "extract.hook"),
    ({"extract": {"n_tokens": 1.5}}, "extract.n_tokens"),
    ({"sae": {"stream": "yes"}}, "sae.stream"),
    ({"data": {"heldout_fraction": 0.9}}, "data.heldout_fraction"),
    ({"sae": {"dsae": 3}}, "sae.dsae"),
    ({"interpret": {"max_usd": float("nan")}}, "interpret.max_usd"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(raw)


def test_layer_beyond_model_is_rejected_with_range():
    with pytest.raises(ConfigError, match=r"extract.layer = 8.*4 layers.*0\.\.3"):
        parse_params({"model": {"num_hidden_layers": 4}})


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads 3e-4 as a string; the config accepts it as the number it means.
    p = parse_params(yaml.safe_load("sae:\n  lr: 3e-4\n"))
    assert p.sae.lr == pytest.approx(3e-4)


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="repository root"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_matches_conf(repo_root, tmp_path):
    """params.yaml is generated from conf/: `dvc repro` would silently run stale params otherwise."""
    fresh = compose_params(root=repo_root, output=tmp_path / "params.yaml")
    committed = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert yaml.safe_load(fresh.read_text()) == committed, (
        "params.yaml disagrees with conf/; run `.venv/bin/saelab params` and commit both")


@pytest.mark.parametrize("profile", ["tiny", "llama-3.2-1b-random", "llama-3.2-1b"])
def test_every_profile_composes_and_validates(repo_root, tmp_path, profile):
    out = compose_params([f"profile={profile}"], root=repo_root, output=tmp_path / "p.yaml")
    p = load_params(out)
    assert p.profile == profile
    if profile != "tiny":
        assert (p.model.hidden_size, p.model.intermediate_size) == (2048, 8192)
        assert (p.model.num_attention_heads, p.model.num_key_value_heads) == (32, 8)
        assert p.extract.context_len == 1024 and p.sae.d_sae == 16384
    if profile == "llama-3.2-1b":
        assert p.model.source == "hub" and len(p.model.revision) == 40


def test_to_dict_round_trips():
    p = parse_params({"sae": {"d_sae": 128}})
    assert parse_params(to_dict(p)) == p


def test_cli_errors_are_one_error_line(tmp_path, capsys):
    # The brief's contract for bad input: one ERROR line naming problem and fix, exit 2.
    assert cli_main(["params", "profile=nope", "--output", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: saelab params: unknown profile 'nope'")
    assert not (tmp_path / "p.yaml").exists()
