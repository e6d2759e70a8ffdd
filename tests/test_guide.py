"""The guide's API on the real default model: train_sae -> load_sae -> trace -> encode/decode."""

from __future__ import annotations

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx
import pytest

from saelab import SAEConfig, cache
from saelab.config import DataConfig
from saelab.data import load_texts

pytestmark = pytest.mark.slow  # loads the default model end to end

SMALL = SAEConfig(expansion_factor=2, k=8, num_epochs=1, batch_size=256)


@pytest.fixture(scope="module")
def model():
    from saelab import InterpretableModel  # the guide's lazy top-level import

    return InterpretableModel("smollm2_135m")


@pytest.fixture(scope="module")
def texts():
    return load_texts(DataConfig())[:40]


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path


def test_guide_snippet_trains_loads_and_reconstructs(model, texts, outputs):
    save = outputs / "my_sae.mlx"
    sae = model.train_sae(layer=1, dataset=texts, config=SMALL, save_path=str(save),
                          max_tokens=3000, context_length=64)
    assert save.is_dir() and sae.d_hidden == 2 * model.d_model
    loaded = model.load_sae(str(save))
    assert loaded.is_compatible(model, layer=1, component="mlp")
    assert not loaded.is_compatible(model, layer=2, component="mlp")
    assert loaded.metadata["train_activations"] + loaded.metadata["val_activations"] == 3000
    with model.trace("The capital of France is") as trace:
        pass
    act = trace.activations["model.layers.1.mlp"]
    features = loaded.encode(act)
    assert (mx.sum(features != 0, axis=-1) <= 8).all().item()
    assert mx.allclose(loaded.decode(features), sae.decode(sae.encode(act))).item()
    # the run's metrics land under <outputs>/runs/
    assert list((outputs / "outputs" / "runs").glob("*/*-train_sae-l1-mlp/metrics.json"))


def test_second_call_reuses_cached_activations(model, texts, outputs):
    import datasets

    before = cache.STATS.captures
    model.train_sae(layer=0, dataset=texts, component="attn", config=SMALL, max_tokens=1000,
                    context_length=64)
    assert cache.STATS.captures == before + 1
    ds = datasets.Dataset.from_dict({"text": texts})  # same texts as a datasets dataset
    model.train_sae(layer=0, dataset=ds, component="attn", config=SMALL, max_tokens=1000,
                    context_length=64)
    assert cache.STATS.captures == before + 1


def test_bad_datasets_are_clear(model, outputs):
    import datasets

    with pytest.raises(ValueError, match=r"dataset has columns \['body'\] and no 'text'"):
        model.train_sae(layer=0, dataset=datasets.Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(ValueError, match=r"dataset=str is not valid; allowed: a non-empty list"):
        model.train_sae(layer=0, dataset="just one string")
    with pytest.raises(ValueError, match=r"dataset with 2 items \(1 strings\) is not valid"):
        model.train_sae(layer=0, dataset=["fine", 3])
    with pytest.raises(ValueError, match=r"layer=30 is not valid for smollm2_135m; allowed: 0\.\.29"):
        model.train_sae(layer=30, dataset=["some text that is long enough"])
