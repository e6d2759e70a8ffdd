"""The fast step's token-half split at its edges: batches too small to halve, odd halves."""

import mlx.core as mx
import numpy as np
import pytest

from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.steps import StepConsts, StepMetrics, make_fast_step, reference_step

D, H, K = 32, 256, 4


def _state(seed: int = 0) -> dict:
    params = dict(SAE(D, H, K, seed=seed).trainable_parameters())
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
