"""The activation cache on the real default model (SmolLM2-135M), shallow layers, a few k tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from saelab import cache
from saelab.config import DataConfig, ModelConfig
from saelab.data import load_texts, pack_documents
from saelab.guide import InterpretableModel
from saelab.trace import activation_name

pytestmark = pytest.mark.slow  # captures from the default model, in subprocesses too

MODEL = ModelConfig()
DATA = DataConfig(max_tokens=2048, context_length=64)
PAIRS = [(1, "mlp"), (1, "output"), (0, "attn")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One capture of three entries; returns (root, entries, stats after it)."""
    root = tmp_path_factory.mktemp("acts")
    before = (cache.STATS.model_loads, cache.STATS.captures)
    entries = cache.ensure_activations(MODEL, DATA, PAIRS, root=root)
    after = (cache.STATS.model_loads, cache.STATS.captures)
    assert after == (before[0] + 1, before[1] + 1)  # one model load, one pass for three entries
    return root, entries


def _stats():
    return cache.STATS.model_loads, cache.STATS.captures, cache.STATS.rebuilt


def test_capture_writes_right_entries(built):
    root, entries = built
    assert set(entries) == set(PAIRS)
    assert len({e.path for e in entries.values()}) == 3
    for (layer, comp), e in entries.items():
        assert e.path.parent == root and len(e.path.name) == 16
        assert e.acts.shape == (2048, 576) and e.acts.dtype == np.float16
        assert isinstance(e.acts, np.memmap)
        assert e.doc_ids.shape == (2048,) and e.doc_ids.dtype == np.int32
        m = json.loads((e.path / "manifest.json").read_text())
        assert m["key"].startswith(e.path.name)
        assert (m["layer"], m["component"], m["n_tokens"], m["d_model"]) == (layer, comp, 2048, 576)
        assert m["dtype"] == "float16" and m["format"] == cache.CACHE_FORMAT
        assert (m["max_tokens"], m["context_length"]) == (2048, 64)
        assert m["model_name"] == MODEL.name
        assert set(m["files"]) == {"acts.npy", "doc_ids.npy"}
        assert all(len(f["sha256"]) == 64 for f in m["files"].values())
        assert np.isfinite(e.acts).all() and np.abs(e.acts).max() > 0
    assert not any(p.name.startswith(".") and ".tmp" in p.name for p in root.iterdir())
    a, b = entries[(1, "mlp")], entries[(1, "output")]
    assert np.array_equal(a.doc_ids, b.doc_ids) and not np.array_equal(a.acts, b.acts)


def test_cached_values_equal_a_direct_trace(built):
    _, entries = built
    model = InterpretableModel(MODEL.name, MODEL.dtype)
    packed = pack_documents(model.tokenizer, load_texts(DATA), DATA.context_length, DATA.max_tokens)
    batch = 16  # the capture's batch: the same matmul shapes give the same numbers
    names = [activation_name(*p) for p in PAIRS]
    tr = model.trace(mx.array(packed.tokens[:batch]), capture=names)
    mask = packed.mask[:batch]
    for pair, name in zip(PAIRS, names):
        want = np.asarray(tr.activations[name].astype(mx.float16))[mask]
        np.testing.assert_array_equal(entries[pair].acts[:len(want)], want)
    assert np.array_equal(entries[PAIRS[0]].doc_ids, packed.token_doc_ids())


def test_second_call_reuses_without_loading_the_model(built):
    root, entries = built
    before = _stats()
    again = cache.ensure_activations(MODEL, DATA, list(reversed(PAIRS)) + [(1, "resid")], root=root)
    assert _stats() == before
    assert {k: e.path for k, e in again.items()} == {k: e.path for k, e in entries.items()}


def test_a_missing_pair_is_captured_alone(built):
    root, entries = built
    before = _stats()
    got = cache.ensure_activations(MODEL, DATA, [(0, "mlp"), (1, "mlp")], root=root)
    assert _stats() == (before[0] + 1, before[1] + 1, before[2])
    assert got[(1, "mlp")].path == entries[(1, "mlp")].path


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "bad_manifest"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage):
    data = DataConfig(max_tokens=1024, context_length=64)
    entry = cache.ensure_activations(MODEL, data, [(0, "mlp")], root=tmp_path)[(0, "mlp")]
    original, key, path = np.array(entry.acts), entry.manifest["key"], entry.path
    acts = path / "acts.npy"
    del entry
    if damage == "flip":
        with open(acts, "r+b") as f:
            f.seek(acts.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        cache._VERIFIED.clear()  # as in a new process: the full checksum runs once per process
    elif damage == "truncate":
        with open(acts, "r+b") as f:
            f.truncate(acts.stat().st_size - 576 * 2)
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text(json.dumps({"key": key}))
    assert cache.open_entry(path, key) is None
    before = _stats()
    rebuilt = cache.ensure_activations(MODEL, data, [(0, "mlp")], root=tmp_path)[(0, "mlp")]
    assert _stats() == (before[0] + 1, before[1] + 1, before[2] + 1)
    assert rebuilt.path == path
    np.testing.assert_array_equal(np.array(rebuilt.acts), original)


def test_split_is_document_level_and_deterministic(built):
    _, entries = built
    e = entries[(1, "mlp")]
    train, val = e.split(0.2, seed=0)
    assert len(train) + len(val) == e.n_tokens and len(np.intersect1d(train, val)) == 0
    train_docs, val_docs = set(e.doc_ids[train].tolist()), set(e.doc_ids[val].tolist())
    assert train_docs and val_docs and not train_docs & val_docs
    n_docs = len(train_docs | val_docs)
    assert len(val_docs) == max(1, round(0.2 * n_docs))
    t2, v2 = e.split(0.2, seed=0)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    other = [set(e.doc_ids[e.split(0.2, seed=s)[1]].tolist()) for s in range(1, 6)]
    assert any(o != val_docs for o in other)
    x_train, x_val = e.arrays(0.2, seed=0)
    assert x_train.dtype == np.float32 and x_train.shape == (len(train), 576)
    np.testing.assert_array_equal(x_val, e.acts[val].astype(np.float32))
    with pytest.raises(ValueError, match="validation_split"):
        e.split(1.5, seed=0)


def test_bad_input_fails_before_model_work(tmp_path):
    before = _stats()
    with pytest.raises(ValueError, match=r"data\.paths=.*missing\.txt"):
        missing = DataConfig(source="files", paths=[str(tmp_path / "missing.txt")])
        cache.ensure_activations(MODEL, missing, [(1, "mlp")], root=tmp_path)
    with pytest.raises(ValueError, match=r"layer=30 .*0\.\.29"):
        cache.ensure_activations(MODEL, DATA, [(30, "mlp")], root=tmp_path)
    with pytest.raises(ValueError, match=r"layer=-1 "):
        cache.ensure_activations(MODEL, DATA, [(-1, "mlp")], root=tmp_path)
    with pytest.raises(ValueError, match=r"component='mlpp'"):
        cache.ensure_activations(MODEL, DATA, [(1, "mlpp")], root=tmp_path)
    assert _stats() == before and not any(tmp_path.iterdir())


def test_texts_corpus(tmp_path):
    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog, again and again." * 3
             for i in range(12)]
    data = DataConfig(max_tokens=500, context_length=32)
    got = cache.ensure_activations(MODEL, data, [(0, "output")], root=tmp_path, texts=texts)
    e = got[(0, "output")]
    assert e.n_tokens == 500 and e.manifest["data"]["source"] == "texts"
    other = cache.ensure_activations(MODEL, data, [(0, "output")], root=tmp_path, texts=texts[:6])
    assert other[(0, "output")].path != e.path


_WORKER = textwrap.dedent("""
    import json, sys
    import saelab
    from saelab import cache
    from saelab.config import DataConfig, ModelConfig
    e = cache.ensure_activations(ModelConfig(), DataConfig(max_tokens=1536, context_length=64),
                                 [(1, "mlp")], root=sys.argv[1])[(1, "mlp")]
    print(json.dumps({"captures": cache.STATS.captures, "loads": cache.STATS.model_loads,
                      "path": str(e.path), "sha": e.manifest["files"]["acts.npy"]["sha256"]}))
""")


def test_two_processes_capture_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["captures"] for o in outs) == [0, 1]
    assert sorted(o["loads"] for o in outs) == [0, 1]  # the waiting worker never loads the model
    assert outs[0]["path"] == outs[1]["path"] and outs[0]["sha"] == outs[1]["sha"]
