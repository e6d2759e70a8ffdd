"""The fast step against the reference step at its edges: batches too small to halve,
odd halves, AuxK over few, many and all latents dead."""

import os

import mlx.core as mx
import numpy as np
import pytest

from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.host_step import adam_consts, make_host_step, make_step
from saelab.kernels import _kernels, host_available, run_threads
from saelab.sae import decode_codes, decode_codes_vjp
from saelab.steps import StepConsts, StepMetrics, _adam, _unit_rows, make_fast_step, reference_step
from saelab.topk import argpartition_topk
from saelab.weight_grads import choose_grad_mode, mlx_weight_grads

D, H, K = 32, 256, 4


def _state(seed: int = 0, tied: bool = False) -> dict:
    params = dict(SAE(D, H, K, seed=seed, tied_weights=tied).trainable_parameters())
    return {"params": params, "m": {k: mx.zeros_like(p) for k, p in params.items()},
            "v": {k: mx.zeros_like(p) for k, p in params.items()},
            "tsf": mx.zeros((H,), mx.int32)}


@pytest.mark.parametrize("tokens", [1, 2, 3, 5])
def test_tiny_batches_match_the_reference(tokens):
    consts = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K), D, H)
    state, x = _state(), mx.random.normal((tokens, D), key=mx.random.key(tokens)) * 3
    lr, t = mx.array(1e-3), mx.array(1.0)
    fast, fast_out = make_step(consts)(state, x, lr, t, 0)
    ref, ref_out = reference_step(state, x, lr, t, 0, consts)
    # one token has no variance about the batch mean: fvu is inf on both sides
    assert np.allclose(StepMetrics.read(fast_out), StepMetrics.read(ref_out), rtol=1e-4)
    if tokens > 1:
        for key, want in ref["params"].items():
            got, want = np.array(fast["params"][key]), np.array(want)
            assert np.allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max()), key
    assert np.array_equal(np.array(fast["tsf"]), np.array(ref["tsf"]))


@pytest.mark.parametrize("dead,k_aux,mode,tied", [
    (5, None, None, False),  # fewer dead than k_aux: every dead latent, padded to 16 columns
    (5, None, "segment", False),  # the same with MLX's weight gradients (None: the C kernel)
    (16, None, "dense", False),  # exactly k_aux
    (40, None, None, True),  # more dead than k_aux: top 16 of 64 columns
    (200, 24, "dense", False),  # top 24 of all 256 columns
    (256, None, None, False)])  # every latent dead
def test_auxk_over_dead_columns_matches_the_reference(dead, k_aux, mode, tied):
    cfg = SAEConfig(expansion_factor=H // D, k=K, k_aux=k_aux, tied_weights=tied)
    consts = StepConsts.from_config(cfg, D, H, grad_mode=mode)
    state = _state(1, tied)
    picked = np.random.default_rng(dead).choice(H, dead, replace=False)
    state["tsf"] = mx.array(np.where(np.isin(np.arange(H), picked), 10**6, 0).astype(np.int32))
    x, lr, t = mx.random.normal((64, D), key=mx.random.key(7)) * 3, mx.array(1e-3), mx.array(1.0)
    fast, fast_out = make_step(consts)(state, x, lr, t, dead)
    ref, ref_out = reference_step(state, x, lr, t, dead, consts)
    got, want = StepMetrics.read(fast_out), StepMetrics.read(ref_out)
    assert want.auxk > 0 and np.allclose(got, want, rtol=1e-4), (got, want)
    for part in ("params", "m", "v"):
        for key, ref_value in ref[part].items():
            a, b = np.array(fast[part][key]), np.array(ref_value)
            assert np.allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max()), (part, key)
    assert np.array_equal(np.array(fast["tsf"]), np.array(ref["tsf"]))


def _need_kernels(require_system):
    require_system("the C extension saelab._kernels", host_available(),
                   "pip install -e . with a C compiler")


def test_the_c_kernels_are_built_and_equal_mlx(require_system):
    """``pip install`` builds them where a C compiler is (CI has gcc), and the step picks
    them on the CPU. sparse_half: argpartition's top-k and the decode and its gradients;
    grad_rows: MLX's segment-sums plus AuxK's rows, the decoder projection, the bias
    gradient, the firing counts, the squared norms and b_dec's term; adam_rows:
    steps._adam and _unit_rows."""
    _need_kernels(require_system)
    assert choose_grad_mode(K, H) == "host" and choose_grad_mode(K, H, host=False) == "segment"
    assert choose_grad_mode(K, H, tied=True) == "segment" and choose_grad_mode(8, H) == "dense"
    cfg = SAEConfig(expansion_factor=H // D, k=K, tied_weights=True)
    with pytest.raises(ValueError, match="grad_mode='host' is not valid with tied weights"):
        make_host_step(StepConsts.from_config(cfg, D, H))
    rng = np.random.default_rng(0)
    n = 11
    pre, x = rng.standard_normal((n, H), np.float32), rng.standard_normal((n, D), np.float32)
    w_enc, w_dec = rng.standard_normal((2, H, D), np.float32)
    b_dec = rng.standard_normal(D, np.float32)
    out = {key: np.empty((n, K), np.uint32 if key == "idx" else np.float32)
           for key in ("idx", "codes", "g_pre", "vg")}
    out |= {key: np.empty((n, D), np.float32) for key in ("xc", "r", "g_r")}
    sums, gbdec = np.zeros((2, 3)), np.zeros((2, D))
    for i, (lo, hi) in enumerate(((0, 5), (5, n))):  # two unequal token halves
        _kernels.sparse_half(pre[lo:hi], x, w_dec, b_dec, lo, K, 0.5, 0.01, out["idx"],
                             out["codes"], out["g_pre"], out["vg"], out["xc"], out["r"],
                             out["g_r"], sums[i], gbdec[i])
    want_idx = np.sort(np.array(argpartition_topk(mx.array(pre), K)), axis=1)
    assert np.array_equal(np.sort(out["idx"], axis=1), want_idx)
    idx = mx.array(out["idx"].astype(np.int32))
    sel = np.take_along_axis(pre, out["idx"].astype(np.int64), axis=1)
    assert np.array_equal(out["codes"], np.maximum(sel, 0))
    r = np.array(decode_codes(mx.array(w_dec), mx.array(out["codes"]), idx)) - (x - b_dec)
    g_v = np.array(decode_codes_vjp(mx.array(w_dec), idx, mx.array(0.5 * r)))
    assert np.allclose(out["r"], r, atol=1e-5) and np.allclose(out["g_r"], 0.5 * r, atol=1e-5)
    assert np.allclose(out["g_pre"], np.where(sel > 0, g_v + 0.01, 0), atol=1e-5)
    assert np.allclose(out["vg"], out["codes"] * g_v, atol=1e-5)
    assert np.allclose(sums.sum(axis=0), [np.square(r).sum(), out["codes"].sum(),
                                          np.count_nonzero(out["codes"])], rtol=1e-5)
    assert np.allclose(gbdec.sum(axis=0), 0.5 * r.sum(axis=0), atol=1e-4)

    enc0, dec0 = (np.array(a) for a in mlx_weight_grads(
        idx, mx.array(out["g_pre"]), mx.array(out["xc"]), mx.array(out["codes"]),
        mx.array(out["g_r"]), H, "segment"))
    cols = np.array([3, 200, 17], np.int32)  # AuxK's latents and their rows
    aux_of = np.full(H, -1, np.int32)
    aux_of[cols] = np.arange(3)
    aux = (*rng.standard_normal((2, 3, D), np.float32), *rng.standard_normal((2, 3), np.float32))
    got = {"enc": np.empty((H, D), np.float32), "dec": np.empty((H, D), np.float32),
           "g_benc": np.empty(H, np.float32), "fired": np.empty(H, np.int32)}
    sq, bdec = np.zeros((2, 2)), np.zeros((2, D))
    for i, (lo, hi) in enumerate(((0, 100), (100, H))):
        _kernels.grad_rows(out["idx"], out["g_pre"], out["codes"], out["vg"], out["xc"],
                           out["g_r"], w_enc, w_dec, aux_of, *aux, lo, hi, got["enc"],
                           got["dec"], got["g_benc"], got["fired"], sq[i], bdec[i])
    flat = out["idx"].reshape(-1)
    g_benc, proj, fired = (np.bincount(flat, weights=out[key].reshape(-1), minlength=H)
                           for key in ("g_pre", "vg", "codes"))
    fired = np.bincount(flat, weights=(out["codes"] > 0).reshape(-1), minlength=H)
    enc0[cols] += aux[0]
    dec0[cols] += aux[1]
    g_benc[cols] += aux[2]
    proj[cols] += aux[3]
    dec0 -= proj[:, None] * w_dec
    assert np.allclose(got["enc"], enc0, atol=1e-5) and np.allclose(got["dec"], dec0, atol=1e-4)
    assert np.allclose(got["g_benc"], g_benc, atol=1e-5)
    assert np.array_equal(got["fired"], fired.astype(np.int32))
    assert np.allclose(sq.sum(axis=0), [np.square(enc0).sum(), np.square(dec0).sum()], rtol=1e-5)
    assert np.allclose(bdec.sum(axis=0), g_benc @ w_enc, rtol=1e-5, atol=1e-4)

    p, m, v, g = (rng.standard_normal((H, D), np.float32) for _ in range(4))
    v = np.abs(v)
    lr, t, clip = 1e-3, 3.0, 0.7
    want_p, want_m, want_v = _adam(*(mx.array(a) for a in (p, m, v)), mx.array(g) * clip,
                                   mx.array(lr), mx.array(t), (0.9, 0.999))
    want_p = _unit_rows(want_p)
    _kernels.adam_rows(p, m, v, g, 0, H, D, adam_consts(clip, lr, t, (0.9, 0.999)), True)
    for got_a, want in ((p, want_p), (m, want_m), (v, want_v)):
        assert np.allclose(got_a, np.array(want), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="idx has 160 bytes, expected 176"):  # 1 line, no crash
        _kernels.sparse_half(pre, x, w_dec, b_dec, 0, K, 0.5, 0.0, out["idx"][:-1],
                             *list(out.values())[1:], sums[0], gbdec[0])


def _host_consts() -> StepConsts:
    return StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K), D, H,
                                  grad_mode="host")


def test_the_kernel_threads_run_in_a_forked_child_of_a_process_that_used_them(require_system):
    _need_kernels(require_system)
    rng = np.random.default_rng(5)
    p, m, v, g = (rng.standard_normal((H, D), np.float32) for _ in range(4))
    v = np.abs(v)
    c = adam_consts(1.0, 1e-3, 1.0, (0.9, 0.999))

    def adam(arrays):  # both halves of the rows, one per pool thread
        run_threads([(_kernels.adam_rows, *arrays, lo, hi, D, c, True)
                     for lo, hi in ((0, H // 2), (H // 2, H))])
        return arrays[0]

    want = adam([a.copy() for a in (p, m, v)] + [g])  # the pool exists in this process now
    pid = os.fork()
    if pid == 0:  # the child (sweep launchers may fork) starts its own pool
        os._exit(0 if np.array_equal(adam([a.copy() for a in (p, m, v)] + [g]), want) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_host_steps_write_only_their_own_arrays(require_system):
    """The C step updates in place the arrays it returned, never a caller's: a state it
    did not return (fresh, or rebuilt as resample_dead does) is copied first."""
    _need_kernels(require_system)
    consts = _host_consts()
    step, state = make_step(consts), _state(2)
    before = {key: np.array(a) for key, a in state["params"].items()}
    x, lr = mx.random.normal((64, D), key=mx.random.key(3)) * 3, mx.array(1e-3)
    one, _ = step(state, x, lr, mx.array(1.0), 0)
    for key, a in state["params"].items():  # the caller's state is untouched
        assert np.array_equal(np.array(a), before[key]), key
    after_one = np.array(one["params"]["W_enc"])
    two, _ = step(one, x, lr, mx.array(2.0), 0)
    assert two["params"]["W_enc"] is one["params"]["W_enc"]  # updated in place
    assert not np.array_equal(np.array(two["params"]["W_enc"]), after_one)
    rebuilt = {**two, "params": {**two["params"], "W_enc": mx.array(np.array(
        two["params"]["W_enc"]))}}
    kept = np.array(rebuilt["params"]["W_enc"])
    ref, _ = reference_step(rebuilt, x, lr, mx.array(3.0), 0, consts)
    mx.eval(ref)  # before the step writes the arrays rebuilt shares with two
    three, _ = step(rebuilt, x, lr, mx.array(3.0), 0)
    assert three["params"]["W_enc"] is not rebuilt["params"]["W_enc"]
    assert np.array_equal(np.array(rebuilt["params"]["W_enc"]), kept)
    for key, want in ref["params"].items():
        assert np.allclose(np.array(three["params"][key]), np.array(want), rtol=1e-3,
                           atol=1e-6), key
    with pytest.raises(ValueError, match="grad_mode='host' is not valid for steps.make_fast"):
        make_fast_step(consts)


def test_aux_width_buckets_the_dead_latents():
    consts = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K, k_aux=48), D, H)
    assert [consts.aux_width(n) for n in (0, 1, 16, 17, 40, 48, 49, 100, 256)] == \
        [0, 16, 16, 32, 48, 48, 64, 128, 256]
    off = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K, auxk=False), D, H)
    assert off.aux_width(100) == 0


def test_host_mode_without_the_extension_is_a_one_line_error(monkeypatch):
    """Where no compiler built saelab._kernels (as ``CC=false pip install -e .`` leaves it),
    asking for ``host`` says so before any work; ``make_step``'s default then runs MLX's step."""
    import saelab.host_step as host_step
    import saelab.weight_grads as weight_grads

    monkeypatch.setattr(host_step, "_kernels", None)
    with pytest.raises(ValueError, match="needs the C extension saelab._kernels"):
        make_host_step(_host_consts())
    monkeypatch.setattr(weight_grads, "host_available", lambda: False)
    consts = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K), D, H)
    state, x = _state(6), mx.random.normal((64, D), key=mx.random.key(6)) * 3
    step = make_step(consts)
    assert step.__qualname__.startswith("make_fast_step")
    got, _ = step(state, x, mx.array(1e-3), mx.array(1.0), 0)
    want, _ = reference_step(state, x, mx.array(1e-3), mx.array(1.0), 0, consts)
    assert np.allclose(np.array(got["params"]["W_dec"]), np.array(want["params"]["W_dec"]),
                       rtol=1e-3, atol=1e-6)
