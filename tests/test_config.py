import pytest

from jaxllm import stages
from jaxllm.config import ConfigError, from_dict, load_config, to_dict


def test_overrides_presets_and_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\n  d_model: 96\ntrain:\n  steps: 7\n")
    config = load_config(recipe, ["train.batch_size=4", "optimizer.learning_rate=1e-3", "init_from=runs/pt"])
    assert config.model.d_model == 96  # explicit key beats the preset
    assert config.model.num_layers == 4  # from the preset
    assert config.train.steps == 7 and config.train.batch_size == 4
    assert config.optimizer.learning_rate == pytest.approx(1e-3)
    assert config.train.init_from == "runs/pt"
    assert from_dict(to_dict(config)) == config


def test_unknown_key_suggests_the_closest_valid_key():
    with pytest.raises(ConfigError, match="'train.setps' is not a known key.*did you mean 'steps'"):
        load_config(None, ["train.setps=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'train.steps'.*expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="'model.tie_embeddings'.*true/false"):
        load_config(None, ["model.tie_embeddings=maybe"])


def test_bad_recipe_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config(None, ["model.num_heads=4", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="unknown.*preset|preset 'huge' is unknown"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ConfigError, match="train.stage='pretrian'.*did you mean 'pretrain'"):
        stages.of(load_config(None, ["train.stage=pretrian"]))  # stage names are the registry's


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_rpo_alpha_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match="feedback.rpo_alpha"):
        load_config(None, [f"feedback.rpo_alpha={value}"])
