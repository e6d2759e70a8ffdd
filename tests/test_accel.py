"""The Linux fast path: OpenBLAS preloaded before mlx.core, reported honestly, switchable off."""

import json
import subprocess
import sys

import pytest

PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    {pre}
    import saelab
    import mlx.core as mx
from saelab.accel import STATE
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
maps = open("/proc/self/maps").read()
print(json.dumps({{"blas_path": STATE.blas_path, "reason": STATE.reason, "blas": STATE.blas,
                  "mapped": bool(STATE.blas_path) and STATE.blas_path in maps,
                  "warnings": [str(x.message) for x in w]}}))
"""


def probe(env_extra=None, pre="pass"):
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("SAELAB_FAST", "SAELAB_BLAS")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux fast path")


def test_openblas_preloaded_and_mapped(require_system):
    r = probe()
    require_system("OpenBLAS", r["blas_path"] is not None, r["reason"])
    assert r["mapped"], "the preloaded BLAS must be mapped in the process"
    assert "OpenBLAS" in r["blas"]


def test_fast_path_can_be_turned_off():
    r = probe({"SAELAB_FAST": "0"})
    assert r["blas_path"] is None
    assert r["reason"] == "disabled by SAELAB_FAST=0"
    assert "reference BLAS" in r["blas"]


def test_missing_blas_warns_clearly():
    r = probe({"SAELAB_BLAS": "/nonexistent/libblas.so.3"})
    assert r["blas_path"] is None
    assert any("reference BLAS" in w for w in r["warnings"]), r


def test_mlx_imported_first_is_reported():
    r = probe(pre="import mlx.core")
    assert r["blas_path"] is None
    assert "import saelab first" in r["reason"]


def test_blas_threads_sets_and_restores(require_system):
    import saelab  # noqa: F401
    from saelab.accel import _BLAS, STATE, blas_threads
    require_system("OpenBLAS", bool(_BLAS), STATE.reason)
    lib = _BLAS[0]
    before = lib.openblas_get_num_threads()
    with blas_threads(1):
        assert lib.openblas_get_num_threads() == 1
    assert lib.openblas_get_num_threads() == before
    with pytest.raises(RuntimeError), blas_threads(1):
        raise RuntimeError("restored on error too")
    assert lib.openblas_get_num_threads() == before
    with blas_threads(None):  # None: left as it is
        assert lib.openblas_get_num_threads() == before
