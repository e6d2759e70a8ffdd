"""Replacements for the element-wise-heavy ops of mlx_lm's forward pass that MLX runs
slowly on CPU: ``swiglu`` and attention.

MLX's CPU ``exp`` is scalar: ~19 ns per element here against ~0.5 ns for an add or
a multiply, so ``swiglu`` (silu(gate) * x) and the softmax inside
``mx.fast.scaled_dot_product_attention`` (no fused CPU kernel) took over half of a
SmolLM2 layer's CPU time, more than its matmuls. ``exp_poly`` computes e^x as
2^n, built in the float's exponent bits, times a degree-7 polynomial in
r = x - n ln 2 (|r| <= ln(2) / 2), all from ops that MLX's compiled CPU kernels
vectorize; it makes ``swiglu`` ~4x and attention ~2x cheaper, at float32 accuracy
(max relative error 1e-7 against float64, where MLX's ``exp`` has 4e-6).
``saelab.trace`` swaps them in for the model's own calls on a CPU (``fast_forward``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
"""ln 2 split so that n * _LN2_HI is exact in float32 for |n| <= 127 (Cody-Waite): the
reduced argument keeps float32 accuracy at every |x|, where x * log2(e) alone loses
|x| ulps (MLX's own ``exp`` is off by 4e-6 relative near |x| = 87)."""
_EXP = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)
"""Taylor coefficients of e^r on |r| <= ln(2) / 2 (truncation error 2e-9)."""
_ROUND = 12582912.0
"""1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer."""


def exp_poly(x: mx.array) -> mx.array:
    """e^x in float32 from adds, multiplies and an exponent-bits shift: 2^126 above,
    exactly 0 below 2^-127 (no denormals there, which would slow every later op)."""
    x = mx.clip(x, -127 * 0.6931471805599453, 126 * 0.6931471805599453)
    n = (x * _LOG2E + _ROUND) - _ROUND  # round to nearest in float adds: floor() is a libm call
    r = (x - n * _LN2_HI) - n * _LN2_LO
    r2 = r * r
    c = _EXP  # Estrin's scheme: a Horner chain's 14 dependent steps stalled the loop
    p = ((c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)) \
        + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


def exp(x: mx.array) -> mx.array:
    """e^x: ``exp_poly`` on a CPU (4x faster than MLX's scalar ``exp`` over a vocabulary's
    logits), MLX's own elsewhere."""
    return exp_poly(x) if mx.default_device() == mx.cpu else mx.exp(x)


@mx.compile
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx_lm's ``swiglu``."""
    return gate * x / (1.0 + exp_poly(-gate))


@mx.compile
def _softmax(scores: mx.array, mask: mx.array) -> mx.array:
    s = scores + mask
    e = exp_poly(s - mx.max(s, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


_CAUSAL: dict[int, mx.array] = {}
QUERY_BLOCK = 32
"""Causal attention runs per block of this many query rows against only the keys up to
the block's end: at 128 tokens, 4 blocks compute 62.5% of the scores and their ``exp``."""


def sdpa(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
         mask: Any, sinks: Any = None) -> mx.array:
    """mlx_lm's ``scaled_dot_product_attention`` for a whole float32 sequence (no KV cache,
    a causal or no mask, grouped-query heads); anything else goes to mlx_lm's own."""
    from mlx_lm.models.base import scaled_dot_product_attention

    b, h, n, d = queries.shape
    kv, s = keys.shape[1], keys.shape[2]
    plain = mask is None or (isinstance(mask, str) and mask == "causal" and n == s)
    if cache is not None or sinks is not None or not plain or h % kv \
            or queries.dtype != mx.float32:
        return scaled_dot_product_attention(queries, keys, values, cache, scale=scale,
                                            mask=mask, sinks=sinks)
    g = h // kv
    q = (queries * scale).reshape(b, kv, g, n, d)  # query heads grouped by their kv head
    if mask is None:
        return _attend(q, keys, values, mx.array(0.0)).reshape(b, h, n, d)
    if n not in _CAUSAL:
        _CAUSAL[n] = mx.triu(mx.full((n, n), -mx.inf), k=1)
    step = max(QUERY_BLOCK, -(-n // 4))  # at most 4 blocks: each is a few more kernels
    out = [_attend(q[:, :, :, a:a + step], keys[:, :, :a + step], values[:, :, :a + step],
                   _CAUSAL[n][a:a + step, :a + step]) for a in range(0, n, step)]
    return mx.concatenate(out, axis=3).reshape(b, h, n, d)


def _attend(q: mx.array, keys: mx.array, values: mx.array, mask: mx.array) -> mx.array:
    """softmax(q k^T + mask) v for q [b, kv, g, m, d] (already scaled) against keys and
    values [b, kv, s, d]: each kv head's g query heads as one matmul."""
    b, kv, g, m, d = q.shape
    s = keys.shape[2]
    scores = (q.reshape(b, kv, g * m, d) @ keys.swapaxes(-1, -2)).reshape(b, kv, g, m, s)
    p = _softmax(scores, mask).reshape(b, kv, g * m, s)
    return (p @ values).reshape(b, kv, g, m, d)


def fast_forward(cls: type) -> Callable:
    """``cls.__call__``; on a CPU, when it calls mlx_lm's ``swiglu`` or
    ``scaled_dot_product_attention`` by their global names (the llama family's MLP and
    attention), a copy of it calling this module's instead: the same values to
    float32 rounding, without MLX's scalar CPU ``exp``."""
    call = cls.__call__
    code = getattr(call, "__code__", None)
    if code is None or mx.default_device() != mx.cpu:
        return call
    from mlx_lm.models.activations import swiglu as lm_swiglu
    from mlx_lm.models.base import scaled_dot_product_attention as lm_sdpa

    fast = {name: new for name, old, new in (
        ("swiglu", lm_swiglu, swiglu),
        ("scaled_dot_product_attention", lm_sdpa, sdpa))
        if name in code.co_names and call.__globals__.get(name) is old}
    if not fast:
        return call
    copy = types.FunctionType(code, {**call.__globals__, **fast}, call.__name__,
                              call.__defaults__, call.__closure__)
    copy.__kwdefaults__ = call.__kwdefaults__
    return copy
