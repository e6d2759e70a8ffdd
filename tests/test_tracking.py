"""W&B callback: a real offline run, read back from its .wandb file."""

import numpy as np
import pytest

from saelab.config import SAEConfig
from saelab.tracking import WandbCallback
from saelab.train import Callback, StopTraining, train_sae_on_arrays
from wandb_offline import read_run

TRAIN = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float16)
META = {"model_name": "synthetic", "layer": 2, "component": "mlp"}
CFG = SAEConfig(expansion_factor=4, k=4, batch_size=256, num_epochs=2, log_every=4)

TRAIN_KEYS = {"train/loss", "train/recon_loss", "train/l0", "train/dead_fraction",
              "train/l1_loss", "train/learning_rate", "train/auxk_loss", "train/tokens"}
VAL_KEYS = {"val/loss", "val/mse", "val/nmse", "val/nmse_p99", "val/explained_variance",
            "val/l0", "val/dead_fraction"}


def test_offline_run_has_config_history_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default
    cb = WandbCallback("saelab-test", "sae_l2_mlp", ["unit"], config={"study": "s1"},
                       dir=tmp_path)
    _, metrics = train_sae_on_arrays(TRAIN, TRAIN[:400], CFG, metadata=META, callbacks=[cb],
                                     progress=False)
    assert cb.run_dir.startswith(str(tmp_path / "wandb" / "offline-run-"))
    run = read_run(cb.run_dir)
    logged = set().union(*run["history"])
    assert TRAIN_KEYS | VAL_KEYS <= logged
    steps = [h["_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [4, 8, 12, 16, 20, 24]
    assert run["summary"]["val/nmse"] == pytest.approx(metrics["val/nmse"])
    config = run["config"]
    assert config["k"] == 4 and config["d_model"] == 32 and config["d_hidden"] == 128
    assert config["layer"] == 2 and config["component"] == "mlp" and config["study"] == "s1"
    assert config["train_activations"] == 3000 and config["val_activations"] == 400
    assert run["run"]["name"] == "sae_l2_mlp" and run["run"]["tags"] == ["unit"]
    assert run["run"]["exit_code"] == 0
    cb.close()  # idempotent after on_end: writes nothing more
    assert cb.run is None and read_run(cb.run_dir) == run


def test_close_finishes_a_run_left_open(tmp_path):
    cb = WandbCallback("saelab-test", "left_open", dir=tmp_path, mode="offline")
    cb.on_start({"k": 4})
    cb.on_log(3, {"train/loss": 0.5})
    cb.close()  # training ended without on_end/on_abort (e.g. an exception in the loop)
    assert cb.run is None
    run = read_run(cb.run_dir)
    assert run["run"]["exit_code"] == 0 and run["config"]["k"] == 4
    assert [(h["_step"], h["train/loss"]) for h in run["history"]] == [(3, 0.5)]


class _Prune(Callback):
    def on_eval(self, step, metrics):
        raise StopTraining("pruned by test")


def test_aborted_run_is_finished_with_reason(tmp_path):
    cb = WandbCallback("saelab-test", "pruned", dir=tmp_path, mode="offline")
    with pytest.raises(StopTraining):
        train_sae_on_arrays(TRAIN, TRAIN[:400], CFG, metadata=META, callbacks=[cb, _Prune()],
                            progress=False)
    run = read_run(cb.run_dir)
    assert run["run"]["exit_code"] == 1
    assert run["summary"]["abort_reason"] == "pruned by test"
    assert any("val/nmse" in h for h in run["history"])
