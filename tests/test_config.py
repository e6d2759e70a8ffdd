"""Config validation: bad values name the field, the value and what is allowed."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from saelab.config import DataConfig, SAEConfig, TrialConfig, canonical_component
from saelab.configs import trial_from_dict


@pytest.mark.parametrize("kwargs, field", [
    ({"k": 0}, "k"), ({"expansion_factor": 0}, "expansion_factor"),
    ({"learning_rate": -1.0}, "learning_rate"), ({"validation_split": 0.7}, "validation_split"),
    ({"lr_decay": "step"}, "lr_decay"), ({"b_dec_init": "random"}, "b_dec_init"),
    ({"warmup_fraction": 1.5}, "warmup_fraction"), ({"adam_betas": [0.9, 1.2]}, "adam_betas"),
    ({"resample_every": 0}, "resample_every"),
])
def test_sae_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError) as e:
        SAEConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and "allowed" in msg


def test_k_must_fit_in_d_hidden():
    cfg = SAEConfig(expansion_factor=1, k=600)
    with pytest.raises(ValueError, match=r"k=600 .*576"):
        cfg.check_dims(576)
    SAEConfig(expansion_factor=2, k=600).check_dims(576)


def test_component_aliases_and_errors():
    assert canonical_component("resid") == "output"
    assert canonical_component("mlp") == "mlp"
    with pytest.raises(ValueError, match="component='mlpp'.*mlp, attn, output"):
        canonical_component("mlpp")
    with pytest.raises(ValueError, match="component"):
        TrialConfig(component="ffn")


def test_data_config_needs_paths_for_files():
    with pytest.raises(ValueError, match=r"data.paths=\[\]"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match="data.source='web'"):
        DataConfig(source="web")


def test_structured_config_round_trip():
    cfg = OmegaConf.structured(TrialConfig)
    cfg.sae.k = 64
    cfg.component = "attn"
    trial = trial_from_dict(OmegaConf.to_container(cfg))
    assert trial.sae.k == 64 and trial.component == "attn"
    with pytest.raises(ValidationError, match="Value 'many' of type 'str' could not be "
                       "converted to Integer") as e:
        cfg.sae.k = "many"
    assert e.value.full_key == "sae.k"


def _compose_in(cwd, monkeypatch, *overrides):
    from hydra import compose, initialize_config_dir

    from saelab.configs import register_configs
    from saelab.configs import conf_dir

    register_configs()
    monkeypatch.chdir(cwd)  # the search path is built when Hydra starts, from this directory
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_sweep_files_come_from_cwd_then_shipped_then_searchpath(tmp_path, monkeypatch):
    from hydra.errors import MissingConfigException

    from saelab.configs import shipped_sweeps_dir, sweep_dirs

    sweeps, extra = tmp_path / "sweeps", tmp_path / "extra" / "sweep"
    sweeps.mkdir()
    extra.mkdir(parents=True)
    (sweeps / "mine.yaml").write_text("# @package _global_\nstudy:\n  name: mine\n")
    (sweeps / "smoke.yaml").write_text("# @package _global_\nstudy:\n  name: my_smoke\n")
    (extra / "other.yaml").write_text("# @package _global_\nstudy:\n  name: other\n")
    assert sweep_dirs(tmp_path) == [sweeps, shipped_sweeps_dir()]
    assert sweep_dirs(tmp_path / "extra") == [shipped_sweeps_dir()]

    def name(*overrides):
        return _compose_in(tmp_path, monkeypatch, *overrides).study.name

    assert name("sweep=mine") == "mine"
    assert name("sweep=smoke") == "my_smoke"  # ./sweeps/NAME.yaml replaces a shipped NAME
    assert name("sweep=quick") == "quick"  # the shipped ones stay selectable
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'extra'}]"
    assert name(searchpath, "sweep=other") == "other"  # Hydra's own DIR/sweep/NAME.yaml
    assert name(searchpath, "sweep=quick") == "quick"
    with pytest.raises(MissingConfigException, match="sweep/nope") as e:
        name("sweep=nope")
    assert all(n in str(e.value) for n in ("mine", "smoke", "quick", "k_expansion"))


def test_sae_presets_compose(tmp_path, monkeypatch):
    resample = trial_from_dict(OmegaConf.to_container(
        _compose_in(tmp_path, monkeypatch, "sae=resample"), resolve=True)).sae
    assert not resample.auxk and resample.resample_every == 100 and resample.k == 32
    topk = _compose_in(tmp_path, monkeypatch, "sae=topk").sae
    assert topk.auxk and topk.resample_every is None
