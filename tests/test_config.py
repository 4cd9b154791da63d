"""Configs: loading, `--config.a.b=VALUE` overrides, the presets' arguments."""

import pytest

from lrulm import config as config_lib

TINY = "configs/lm/tiny.py:test"


def _config(*overrides):
    return config_lib.load_with_overrides(TINY, [tuple(o.split("=", 1)) for o in overrides])


def test_unknown_config_key():
    with pytest.raises(config_lib.ConfigError, match="did you mean 'train.steps'"):
        _config("train.stpes=3")
    with pytest.raises(config_lib.ConfigError, match="train.steps=abc: expected an integer"):
        _config("train.steps=abc")
    with pytest.raises(config_lib.ConfigError, match="train.steps=2.5: expected an integer"):
        _config("train.steps=2.5")
    with pytest.raises(config_lib.ConfigError, match="optim.lr=fast: expected a number"):
        _config("optim.lr=fast")
    with pytest.raises(config_lib.ConfigError, match=r"group of settings.*fields: .*num_layers"):
        _config("model=3")
    assert _config("train.steps=1e3").train.steps == 1000
    # model.* fields are placeholders (the preset fills them): parsed by their own type
    assert _config("model.num_layers=1e1").model.num_layers == 10
    assert _config("model.tie_embeddings=0").model.tie_embeddings is False
    assert _config("model.d_model=None").model.d_model is None
    with pytest.raises(config_lib.ConfigError, match="model.num_layers=abc: expected an integer"):
        _config("model.num_layers=abc")
    # A run's config.json read back (`lrulm eval --workdir`): its null fields take overrides.
    saved = config_lib.from_dict(config_lib.to_dict(_config()))
    config_lib.override(saved, "model.scan_method", "sequential")
    config_lib.override(saved, "model.remat", "full")
    assert (saved.model.scan_method, saved.model.remat) == ("sequential", "full")


def test_base_config_takes_only_a_size():
    """A misspelt argument started the 125m run; now it is an error naming the sizes."""
    assert config_lib.load("configs/lm/base.py:size=350m").model.preset == "350m"
    assert config_lib.load("configs/lm/base.py:1.3b").model.preset == "1.3b"
    assert config_lib.load("configs/lm/base.py").model.preset == "125m"
    for bad in ("sise=350m", "size=350m,steps=10", "350M"):
        with pytest.raises(ValueError, match=r"takes size=S or S, S one of 125m, 350m, 1.3b"):
            config_lib.load(f"configs/lm/base.py:{bad}")


def test_a_resume_names_real_changes_not_keys_added_since(tmp_path):
    """A run started before a key existed resumes with it at its default: that is the
    run's own behaviour, not a change; a changed or removed value is named."""
    import json

    config = config_lib.load_with_overrides("configs/lm/tiny.py", [("train.steps", "5")])
    config_lib.write_run_config(config, str(tmp_path), resumed=False)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["optim"]["schedule"], old["data"]["seed"]  # as written before they existed
    old["train"]["made_up"] = 1
    path.write_text(json.dumps(old))
    config = config_lib.load_with_overrides(
        "configs/lm/tiny.py", [("train.steps", "9"), ("data.seed", "3")]
    )
    changed = config_lib.write_run_config(config, str(tmp_path), resumed=True)
    assert changed == ["data.seed: unset -> 3", "train.made_up: 1 -> unset", "train.steps: 5 -> 9"]


def test_a_config_json_from_before_new_keys_takes_overrides_of_them():
    """`lrulm eval --workdir RUN --config.train.NEW=...` on a run older than the key: the
    workdir's config.json takes the key at its default, then the override."""
    old = config_lib.to_dict(config_lib.load_with_overrides("configs/lm/tiny.py:test", []))
    del old["train"]["eval_by_context"], old["data"]["eval_sets"]
    config = config_lib.from_dict(old)
    assert config.train.eval_by_context is False and config.data.eval_sets == ""
    config_lib.override(config, "train.eval_by_context", "true")
    assert config.train.eval_by_context is True
    assert config.train.steps == old["train"]["steps"]  # what the run had is kept
