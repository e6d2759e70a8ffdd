"""Config validation: bad values name the field, the value and what is allowed."""

import pytest
from omegaconf import OmegaConf

from saelab.config import (DataConfig, SAEConfig, TrialConfig, canonical_component,
                           trial_from_dict)


@pytest.mark.parametrize("kwargs, field", [
    ({"k": 0}, "k"), ({"expansion_factor": 0}, "expansion_factor"),
    ({"learning_rate": -1.0}, "learning_rate"), ({"validation_split": 0.7}, "validation_split"),
    ({"lr_decay": "step"}, "lr_decay"), ({"b_dec_init": "random"}, "b_dec_init"),
    ({"warmup_fraction": 1.5}, "warmup_fraction"), ({"adam_betas": [0.9, 1.2]}, "adam_betas"),
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
    with pytest.raises(Exception, match="sae.k"):
        cfg.sae.k = "many"
