"""saelab.fastops against MLX / mlx_lm: exp_poly, swiglu, attention, the swapped-in forward."""

import saelab  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as lm_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as lm_sdpa
from mlx_lm.models.llama import MLP, Attention

from saelab.fastops import exp_poly, fast_forward, sdpa, swiglu


def test_exp_poly_matches_exp_over_the_float32_range():
    x = np.concatenate([np.linspace(-100, 100, 200001), [-np.inf, -1e30, -1e4, -88.8, -87.3,
                                                         0.0, 1e-8, 87.0, 88.0, 1e4, 1e30]])
    x = x.astype(np.float32)
    got = np.asarray(exp_poly(mx.array(x)))
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    normal = (want >= 2.0**-126) & (want <= 2.0**126)
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    mlx_rel = np.abs(np.asarray(mx.exp(mx.array(x)))[normal] - want[normal]) / want[normal]
    assert rel.max() < 3e-7 and rel.max() <= mlx_rel.max()  # float32 rounding; MLX's: 4e-6
    assert (got[want < 2.0**-127] == 0).all()  # no denormals
    top = got[want > 2.0**126]  # saturates at 2^126 (to the clip bound's rounding), finite
    assert np.allclose(top, 2.0**126, rtol=1e-5) and np.isfinite(got).all() and (got >= 0).all()


def test_swiglu_matches_mlx_lm():
    gate, x = (mx.random.normal((3, 17, 64), key=mx.random.key(i)) * 6 for i in range(2))
    got, want = swiglu(gate, x), lm_swiglu(gate, x)
    assert mx.allclose(got, want, rtol=2e-6, atol=1e-6).item()


@pytest.mark.parametrize("mask", ["causal", None])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])  # grouped-query and plain heads
@pytest.mark.parametrize("n", [19, 100])  # one query block; four, the last one short
def test_sdpa_matches_mlx_lm(mask, heads, n):
    h, kv = heads
    b, d = 2, 16
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)) * 2
               for i, shape in enumerate([(b, h, n, d), (b, kv, n, d), (b, kv, n, d)]))
    got = sdpa(q, k, v, None, scale=d**-0.5, mask=mask)
    want = lm_sdpa(q, k, v, None, scale=d**-0.5, mask=mask)
    assert got.shape == want.shape == (b, h, n, d)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def test_sdpa_hands_other_cases_to_mlx_lm():
    q = mx.random.normal((1, 2, 5, 8), key=mx.random.key(0))
    k = mx.random.normal((1, 2, 7, 8), key=mx.random.key(1))  # keys longer than queries
    array_mask = mx.zeros((5, 7))
    for mask in ("causal", array_mask):
        want = lm_sdpa(q, k, k, None, scale=0.3, mask=mask)
        assert mx.array_equal(sdpa(q, k, k, None, scale=0.3, mask=mask), want).item()


def test_fast_forward_swaps_only_mlx_lm_calls():
    assert fast_forward(MLP).__globals__["swiglu"] is swiglu
    assert fast_forward(Attention).__globals__["scaled_dot_product_attention"] is sdpa
    assert fast_forward(nn.RMSNorm) is nn.RMSNorm.__call__  # uses neither name

    def swiglu_own(gate, x):  # a same-named function that is not mlx_lm's stays
        return gate * x

    class Own(nn.Module):
        def __call__(self, x):
            return swiglu_own(x, x)

    assert fast_forward(Own) is Own.__call__


@pytest.mark.slow  # loads the default model
def test_traced_forward_equals_the_stock_forward():
    from saelab.trace import TracedModel

    model = TracedModel()
    tokens = mx.array(np.random.default_rng(0).integers(0, 49152, (2, 48)), dtype=mx.int32)
    fast = model.model(tokens)
    swapped = [(m, type(m)) for block in model.model.layers for m in (block.mlp, block.self_attn)]
    try:
        for m, sub in swapped:  # back to mlx_lm's classes: the stock forward
            m.__class__ = sub.__mro__[1]
        stock = model.model(tokens)
        mx.eval(stock)
    finally:
        for m, sub in swapped:
            m.__class__ = sub
    scale = mx.abs(stock).max().item()
    assert mx.abs(fast - stock).max().item() <= 1e-4 * scale
    assert (fast.argmax(-1) == stock.argmax(-1)).all().item()
