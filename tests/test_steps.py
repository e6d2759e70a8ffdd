"""The fast step against the reference step at its edges: batches too small to halve,
odd halves, AuxK over few, many and all latents dead."""

import os

import mlx.core as mx
import numpy as np
import pytest

from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.steps import StepConsts, StepMetrics, make_fast_step, reference_step
from saelab.weight_grads import (choose_grad_mode, host_available, host_weight_grads,
                                 mlx_weight_grads)

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
    fast, fast_out = make_fast_step(consts)(state, x, lr, t, 0)
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
    fast, fast_out = make_fast_step(consts)(state, x, lr, t, dead)
    ref, ref_out = reference_step(state, x, lr, t, dead, consts)
    got, want = StepMetrics.read(fast_out), StepMetrics.read(ref_out)
    assert want.auxk > 0 and np.allclose(got, want, rtol=1e-4), (got, want)
    for part in ("params", "m", "v"):
        for key, ref_value in ref[part].items():
            a, b = np.array(fast[part][key]), np.array(ref_value)
            assert np.allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max()), (part, key)
    assert np.array_equal(np.array(fast["tsf"]), np.array(ref["tsf"]))


def test_the_c_kernel_is_built_and_equals_the_mlx_segment_sums(require_system):
    """``pip install`` builds it where a C compiler is (CI has gcc); the step picks it
    on the CPU."""
    require_system("the C extension saelab._kernels", host_available(),
                   "pip install -e . with a C compiler")
    assert choose_grad_mode(K, H) == "host"
    assert choose_grad_mode(K, H, tied=True) == "segment" and choose_grad_mode(8, H) == "dense"
    tied = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K, tied_weights=True), D, H,
                                  grad_mode="host")
    with pytest.raises(ValueError, match="grad_mode='host' is not valid with tied weights"):
        make_fast_step(tied)
    rng = np.random.default_rng(0)
    halves = []
    for n in (5, 6):  # unequal token slices, joined in batch order
        idx = np.stack([rng.choice(H, K, replace=False) for _ in range(n)]).astype(np.uint32)
        halves.append((mx.array(idx), *(mx.array(rng.standard_normal(shape, np.float32))
                                        for shape in ((n, K), (n, K), (n, D), (n, D)))))
    enc, dec = host_weight_grads(halves, H)
    idx, g_pre, codes, xc, g_r = (mx.concatenate([h[i] for h in halves]) for i in range(5))
    want = mlx_weight_grads(idx, g_pre, xc, codes, g_r, H, "segment")
    assert np.allclose(np.array(enc), np.array(want[0]), atol=1e-5)
    assert np.allclose(np.array(dec), np.array(want[1]), atol=1e-5)
    assert np.abs(np.array(enc)).sum(axis=1).astype(bool).sum() <= 11 * K  # only touched rows


def test_the_c_kernel_runs_in_a_forked_child_of_a_process_that_used_it(require_system):
    require_system("the C extension saelab._kernels", host_available(),
                   "pip install -e . with a C compiler")
    slices = [(mx.array(np.arange(8, dtype=np.uint32).reshape(2, 4)),
               *(mx.ones(shape) for shape in ((2, 4), (2, 4), (2, D), (2, D))))]
    host_weight_grads(slices, H)  # the thread pool now exists in this process
    pid = os.fork()
    if pid == 0:  # the child (sweep launchers may fork) computes the same sums
        enc, _ = host_weight_grads(slices, H)
        os._exit(0 if float(np.array(enc).sum()) == 2 * 4 * D else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_aux_width_buckets_the_dead_latents():
    consts = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K, k_aux=48), D, H)
    assert [consts.aux_width(n) for n in (0, 1, 16, 17, 40, 48, 49, 100, 256)] == \
        [0, 16, 16, 32, 48, 48, 64, 128, 256]
    off = StepConsts.from_config(SAEConfig(expansion_factor=H // D, k=K, auxk=False), D, H)
    assert off.aux_width(100) == 0
