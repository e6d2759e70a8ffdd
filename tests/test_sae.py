"""The SAE module: shapes, top-k exactness, save/load, compatibility."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

import saelab  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from saelab import sae as sae_module
from saelab.sae import SAE, decode_codes, decode_codes_vjp
from saelab.topk import argpartition_topk, block_topk, fast_topk

META = {"model_name": "smollm2_135m", "layer": 10, "component": "mlp"}


def _sae(**kw) -> SAE:
    sae = SAE(64, 512, 16, metadata=META, **kw)
    sae.input_scale = mx.array(0.37)
    sae.b_dec = mx.random.normal((64,), key=mx.random.key(3))
    return sae


@pytest.mark.parametrize("shape,k", [((300, 4608), 32), ((257, 1000), 7), ((64, 9216), 288),
                                     ((10, 40), 8)])
def test_block_topk_matches_argpartition(shape, k):
    x = mx.random.normal(shape, key=mx.random.key(k))
    xs = np.array(x)
    ref = np.sort(np.array(argpartition_topk(x, k)), axis=1)
    kth = np.take_along_axis(xs, ref, axis=1).min(axis=1, keepdims=True)
    untied = (xs == kth).sum(axis=1) == 1  # random float32 normals do tie now and then
    assert untied.mean() > 0.9
    for fn in (block_topk, fast_topk):
        got = np.sort(np.array(fn(x, k)), axis=1)
        assert np.array_equal(got[untied], ref[untied])
        assert np.array_equal(np.sort(np.take_along_axis(xs, got, axis=1), axis=1),
                              np.sort(np.take_along_axis(xs, ref, axis=1), axis=1))


def test_block_topk_with_masked_latents():
    # AuxK masks live latents with -inf; the selected finite values must match.
    x = mx.random.normal((128, 2048), key=mx.random.key(1))
    x = mx.where(mx.random.uniform(shape=(2048,), key=mx.random.key(2)) < 0.01, x, -mx.inf)
    got = np.sort(np.array(mx.take_along_axis(x, fast_topk(x, 64), axis=1)), axis=1)
    ref = np.sort(np.array(mx.take_along_axis(x, argpartition_topk(x, 64), axis=1)), axis=1)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("latents,k,gather_bytes", [
    (512, 8, 1 << 28), (512, 8, 3 * 8 * 64 * 4), (512, 64, 1 << 28)])
def test_decode_codes_and_vjp_match_dense(monkeypatch, latents, k, gather_bytes):
    # gather (512 >= 8 * GATHER_RATIO), in 3-token chunks, dense code (64 * GATHER_RATIO > 512)
    monkeypatch.setattr(sae_module, "GATHER_BYTES", gather_bytes)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(latents, 64)).astype(np.float32)
    idx = np.argsort(rng.random((37, latents)), axis=1)[:, :k].astype(np.uint32)
    values = rng.exponential(size=(37, k)).astype(np.float32)
    g_out = rng.normal(size=(37, 64)).astype(np.float32)
    dense = np.zeros((37, latents), np.float32)
    np.put_along_axis(dense, idx, values, axis=1)
    args = mx.array(w), mx.array(values), mx.array(idx)
    assert np.allclose(np.array(decode_codes(*args)), dense @ w, atol=1e-4)
    want_vjp = np.take_along_axis(g_out @ w.T, idx, axis=1)
    got_vjp = decode_codes_vjp(mx.array(w), mx.array(idx), mx.array(g_out))
    assert np.allclose(np.array(got_vjp), want_vjp, atol=1e-4)


def test_shapes_and_exact_k():
    sae = _sae()
    x = mx.random.normal((2, 5, 64), key=mx.random.key(0)) * 3
    values, idx = sae.encode_topk(x)
    assert values.shape == idx.shape == (2, 5, 16)
    feats = sae.encode(x)
    assert feats.shape == (2, 5, 512)
    assert (np.array(feats != 0).sum(-1) <= 16).all()
    assert np.array(feats != 0).sum(-1).max() == 16
    recon = sae.decode(feats)
    assert recon.shape == (2, 5, 64)
    assert np.allclose(np.array(recon), np.array(sae(x)), atol=1e-4)
    assert np.allclose(np.array(recon), np.array(sae.decode_topk(values, idx)), atol=1e-4)


def test_decoder_rows_unit_norm_at_init():
    for tied in (False, True):
        norms = np.linalg.norm(np.array(_sae(tied_weights=tied).decoder_weight), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5)


def test_save_load_roundtrip_bit_for_bit(tmp_path):
    sae = _sae()
    sae.update_metadata(metrics={"val/nmse": np.float32(0.1)})
    path = sae.save(tmp_path / "my_sae.mlx")
    assert sorted(p.name for p in path.iterdir()) == ["sae.json", "sae.safetensors"]
    loaded = SAE.load(path)
    a = dict(tree_flatten(sae.parameters()))
    b = dict(tree_flatten(loaded.parameters()))
    assert a.keys() == b.keys() == {"W_enc", "b_enc", "W_dec", "b_dec", "input_scale"}
    for key in a:
        assert np.array_equal(np.array(a[key]), np.array(b[key])), key
    assert loaded.metadata["layer"] == 10 and loaded.metadata["k"] == 16
    assert loaded.metadata["metrics"]["val/nmse"] == pytest.approx(0.1)
    x = mx.random.normal((4, 64), key=mx.random.key(9))
    assert np.array_equal(np.array(sae(x)), np.array(loaded(x)))


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "sae.mlx"
    _sae().save(path)
    second = SAE(64, 256, 8, metadata=META, tied_weights=True)
    second.save(path)
    assert SAE.load(path).d_hidden == 256 and SAE.load(path).tied_weights
    assert [p.name for p in tmp_path.iterdir()] == ["sae.mlx"]  # no temp leftovers


def test_load_rejects_non_sae(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved SAE"):
        SAE.load(tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "sae.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        SAE.load(tmp_path)


def test_is_compatible():
    sae = _sae()
    model = SimpleNamespace(info=SimpleNamespace(name="smollm2_135m", identity="abc"), d_model=64)
    assert sae.is_compatible(model, layer=10, component="mlp")
    assert sae.is_compatible("smollm2_135m", 10, "mlp")
    assert not sae.is_compatible(model, layer=11, component="mlp")
    assert not sae.is_compatible(model, layer=10, component="attn")
    assert not sae.is_compatible("other-model", 10, "mlp")
    wide = SimpleNamespace(info=model.info, d_model=576)
    assert not sae.is_compatible(wide, 10, "mlp")
    sae.update_metadata(component="output", model_identity="xyz")
    assert sae.is_compatible("smollm2_135m", 10, "resid")  # alias of output
    assert not sae.is_compatible(model, 10, "output")  # identity differs
    with pytest.raises(ValueError, match="component"):
        sae.is_compatible(model, 10, "mlpp")


def test_bad_shape_arguments():
    with pytest.raises(ValueError, match="k=600"):
        SAE(64, 512, 600)
    with pytest.raises(ValueError, match="d_model"):
        _sae().encode(mx.zeros((3, 65)))
