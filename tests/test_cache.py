"""The activation cache: sharded capture on the real default model (shallow layers, a few k
tokens), resume after a SIGKILL, corruption, two processes; the out-of-core reader on
synthetic entries written in the real format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from saelab import cache, shards
from saelab.batches import ArrayRows, EntryRows
from saelab.config import DataConfig, ModelConfig
from saelab.data import load_texts, pack_documents
from saelab.entry import CorruptShardError, open_entry
from saelab.guide import InterpretableModel
from saelab.shards import EntryBuilder
from saelab.names import activation_name

MODEL = ModelConfig()
DATA = DataConfig(max_tokens=2048, context_length=64)
PAIRS = [(1, "mlp"), (1, "output"), (0, "attn")]
SEQS = 16  # sequences per shard in these tests: several shards from a few k tokens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One capture of three entries; returns (root, entries)."""
    root = tmp_path_factory.mktemp("acts")
    before = (cache.STATS.model_loads, cache.STATS.captures)
    entries = cache.ensure_activations(MODEL, DATA, PAIRS, root=root, shard_sequences=SEQS)
    after = (cache.STATS.model_loads, cache.STATS.captures)
    assert after == (before[0] + 1, before[1] + 1)  # one model load, one pass for three entries
    return root, entries


def _stats():
    return cache.STATS.model_loads, cache.STATS.captures, cache.STATS.rebuilt


def _files(path):
    """Every file of an entry (relative name -> bytes), manifest without timings."""
    out = {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    m = json.loads(out.pop("manifest.json"))
    for k in ("capture_seconds", "created"):
        m.pop(k)
    return out, m


@pytest.mark.slow
def test_capture_writes_right_entries(built):
    root, entries = built
    assert set(entries) == set(PAIRS)
    assert len({e.path for e in entries.values()}) == 3
    for (layer, comp), e in entries.items():
        assert e.path.parent == root and len(e.path.name) == 16
        assert e.n_tokens == 2048 and e.d_model == 576 and e.n_shards >= 3
        assert all(isinstance(s, np.memmap) and s.dtype == np.float16 for s in e.shards)
        assert e.offsets[-1] == 2048
        assert e.docs.dtype == np.int64 and e.docs[0, 1] == 0 and e.docs[-1, 2] == 2048
        assert (e.docs[1:, 1] == e.docs[:-1, 2]).all()
        assert len(np.unique(e.docs[:, 0])) == len(e.docs)
        m = json.loads((e.path / "manifest.json").read_text())
        assert m["key"].startswith(e.path.name)
        assert (m["layer"], m["component"], m["n_tokens"], m["d_model"]) == (layer, comp, 2048, 576)
        assert m["dtype"] == "float16" and m["format"] == shards.CACHE_FORMAT
        assert (m["max_tokens"], m["context_length"]) == (2048, 64)
        assert m["layout"] == {"d_model": 576, "shard_sequences": SEQS, "batch_size": 16}
        assert m["model_name"] == MODEL.name and m["n_shards"] == e.n_shards
        assert all(len(s["sha256"]) == 64 for s in m["shards"])
        assert sorted(p.name for p in (e.path / "shards").iterdir()) == \
            [s["file"] for s in m["shards"]]
        assert not (e.path / "progress.json").exists()
        x = e.read_runs(np.array([[0, e.n_tokens]]))
        assert np.isfinite(x).all() and np.abs(x).max() > 0
    assert not any(p.name.startswith(".") and p.name != ".locks" for p in root.iterdir())
    a, b = entries[(1, "mlp")], entries[(1, "output")]
    assert np.array_equal(a.docs, b.docs) and not np.array_equal(a.shards[0], b.shards[0])


@pytest.mark.slow
def test_cached_values_equal_a_direct_trace(built):
    _, entries = built
    model = InterpretableModel(MODEL.name, MODEL.dtype)
    packed = pack_documents(model.tokenizer, load_texts(DATA), DATA.context_length, DATA.max_tokens)
    names = [activation_name(*p) for p in PAIRS]
    half = 16 // cache.CAPTURE_STREAMS  # the capture's slices: the same matmul shapes
    want = {n: [] for n in names}
    for lo in range(0, 16, half):
        tr = model.trace(mx.array(packed.tokens[lo:lo + half]), capture=names)
        for n in names:
            want[n].append(np.asarray(tr.activations[n].astype(mx.float16)))
    for pair, name in zip(PAIRS, names, strict=True):
        w = np.concatenate(want[name])[packed.mask[:16]]
        np.testing.assert_array_equal(entries[pair].read_runs(np.array([[0, len(w)]]),
                                                              np.float16), w)
    runs = np.stack([packed.doc_ids, packed.mask.sum(1)], 1)
    docs = entries[PAIRS[0]].docs
    assert [d for d, _ in runs[np.r_[True, runs[1:, 0] != runs[:-1, 0]]]] == docs[:, 0].tolist()


@pytest.mark.slow
def test_second_call_reuses_without_loading_the_model(built):
    root, entries = built
    before = _stats()
    again = cache.ensure_activations(MODEL, DATA, list(reversed(PAIRS)) + [(1, "resid")], root=root)
    assert _stats() == before
    assert {k: e.path for k, e in again.items()} == {k: e.path for k, e in entries.items()}


@pytest.mark.slow
def test_a_missing_pair_is_captured_alone(built):
    root, entries = built
    before = _stats()
    got = cache.ensure_activations(MODEL, DATA, [(0, "mlp"), (1, "mlp")], root=root)
    assert _stats() == (before[0] + 1, before[1] + 1, before[2])
    assert got[(1, "mlp")].path == entries[(1, "mlp")].path


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "bad_manifest", "docs"])
def test_corrupt_entry_is_detected_never_read_and_repaired(tmp_path, damage):
    data = DataConfig(max_tokens=1024, context_length=64)
    entry = cache.ensure_activations(MODEL, data, [(0, "mlp")], root=tmp_path,
                                     shard_sequences=SEQS)[(0, "mlp")]
    key, path = entry.manifest["key"], entry.path
    original = _files(path)
    assert entry.n_shards >= 2
    shard = path / "shards" / shards.shard_name(1)
    if damage == "flip":
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        shards.VERIFIED_SHARDS.clear()  # as in a new process: each shard checked once per process
        reopened = open_entry(path, key)  # sizes and headers are fine: opening reads no rows
        assert reopened is not None
        reopened.rows(0)
        with pytest.raises(CorruptShardError, match="failed its checksum"):
            reopened.read_runs(np.array([[0, reopened.n_tokens]]))
        assert not shard.exists() and shard.with_name(shard.name + ".corrupt").exists()
    elif damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 576 * 2)
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (path / "manifest.json").write_text(json.dumps({"key": key}))
    else:
        docs = np.load(path / "docs.npy")
        docs[0, 0] += 1
        np.save(path / "docs.npy", docs)
    assert open_entry(path, key) is None
    before, written = _stats(), cache.STATS.shards_written
    rebuilt = cache.ensure_activations(MODEL, data, [(0, "mlp")], root=tmp_path,
                                       shard_sequences=SEQS)[(0, "mlp")]
    assert _stats() == (before[0] + 1, before[1] + 1, before[2] + 1)
    # a damaged shard is recaptured alone; without a manifest everything is
    expect = {"flip": 1, "truncate": 1, "docs": 0}.get(damage, entry.n_shards)
    assert cache.STATS.shards_written - written == expect
    assert rebuilt.path == path and _files(path) == original
    rebuilt.read_runs(np.array([[0, rebuilt.n_tokens]]))


@pytest.mark.slow
def test_split_is_document_level_and_deterministic(built):
    _, entries = built
    e = entries[(1, "mlp")]
    sp = e.split(0.2, seed=0)
    assert sp.n_train + sp.n_val == e.n_tokens
    rows = lambda runs: set(np.concatenate([np.arange(a, b) for a, b in runs]).tolist())  # noqa: E731
    train, val = rows(sp.train), rows(sp.val)
    assert not train & val and len(train | val) == e.n_tokens
    doc_of = lambda r: int(e.docs[np.searchsorted(e.docs[:, 2], r, side="right"), 0])  # noqa: E731
    train_docs, val_docs = {doc_of(r) for r in train}, {doc_of(r) for r in val}
    assert train_docs and not train_docs & val_docs and val_docs == set(sp.val_docs.tolist())
    assert len(val_docs) == max(1, round(0.2 * len(e.docs)))
    again = e.split(0.2, seed=0)
    assert np.array_equal(sp.train, again.train) and np.array_equal(sp.val, again.val)
    assert any(not np.array_equal(e.split(0.2, seed=s).val_docs, sp.val_docs) for s in range(1, 6))
    x_val = e.validation(sp, max_tokens=10**9)
    want = np.concatenate([e.read_runs(np.array([[a, b]])) for a, b in sp.val])
    np.testing.assert_array_equal(x_val, want)
    capped = e.validation(sp, max_tokens=50)
    assert capped.dtype == np.float32 and capped.shape == (50, 576)
    assert np.array_equal(capped, e.validation(e.split(0.2, seed=0), max_tokens=50))
    with pytest.raises(ValueError, match="validation_split"):
        e.split(1.5, seed=0)


@pytest.mark.slow
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


@pytest.mark.slow
def test_texts_corpus(tmp_path):
    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog, again and again." * 3
             for i in range(12)]
    data = DataConfig(max_tokens=500, context_length=32)
    got = cache.ensure_activations(MODEL, data, [(0, "output")], root=tmp_path, texts=texts)
    e = got[(0, "output")]
    assert e.n_tokens == 500 and e.manifest["data"]["source"] == "texts"
    assert len(set(e.docs[:, 0].tolist())) == len(e.docs) and e.docs[:, 0].max() < len(texts)
    other = cache.ensure_activations(MODEL, data, [(0, "output")], root=tmp_path, texts=texts[:6])
    assert other[(0, "output")].path != e.path


_WORKER = textwrap.dedent("""
    import json, sys
    import saelab
    from saelab import cache
    from saelab.config import DataConfig, ModelConfig
    data = DataConfig(max_tokens=int(sys.argv[2]), context_length=64)
    e = cache.ensure_activations(ModelConfig(), data, [(1, "mlp")], root=sys.argv[1],
                                 shard_sequences=16)[(1, "mlp")]
    print(json.dumps({"captures": cache.STATS.captures, "loads": cache.STATS.model_loads,
                      "shards": cache.STATS.shards_written, "path": str(e.path),
                      "sha": [s["sha256"] for s in e.manifest["shards"]]}))
""")


@pytest.mark.slow
def test_two_processes_capture_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), "1536"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["captures"] for o in outs) == [0, 1]
    assert sorted(o["loads"] for o in outs) == [0, 1]  # the waiting worker never loads the model
    assert sorted(o["shards"] for o in outs) == [0, len(outs[0]["sha"])]  # each shard written once
    assert outs[0]["path"] == outs[1]["path"] and outs[0]["sha"] == outs[1]["sha"]


@pytest.mark.slow
def test_killed_capture_resumes_and_writes_the_same_bytes(tmp_path):
    tokens = "6000"
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "killed"), tokens],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.monotonic() + 240, 0
    try:
        while time.monotonic() < deadline and done < 2:  # kill once two shards are recorded
            time.sleep(0.05)
            for prog in (tmp_path / "killed").glob(".*.partial/progress.json"):
                try:
                    done = len(json.loads(prog.read_text())["shards"])
                except (OSError, ValueError):
                    pass  # never half-written: atomic replace; but it may vanish at the end
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done >= 2, "the capture never recorded two shards"
    (partial,) = (tmp_path / "killed").glob(".*.partial")
    recorded = json.loads((partial / "progress.json").read_text())["shards"]
    assert not any(p.name[0] != "." for p in (tmp_path / "killed").iterdir())  # no entry yet
    before = cache.STATS.shards_written
    data = DataConfig(max_tokens=int(tokens), context_length=64)
    resumed = cache.ensure_activations(MODEL, data, [(1, "mlp")], root=tmp_path / "killed",
                                       shard_sequences=16)[(1, "mlp")]
    assert not partial.exists()
    # the resumed capture redid only the shards the kill had not recorded
    assert cache.STATS.shards_written - before == resumed.n_shards - len(recorded)
    assert resumed.n_shards >= 4
    whole = cache.ensure_activations(MODEL, data, [(1, "mlp")], root=tmp_path / "whole",
                                     shard_sequences=16)[(1, "mlp")]
    assert _files(resumed.path) == _files(whole.path)


# ---------------------------------------------------------------- the out-of-core reader


def _synthetic(root, shard_rows=(300, 250, 400, 123), n_docs=40, d=8, seed=0):
    """An entry in the real format whose row r holds r in its first two columns."""
    layout = {"d_model": d, "shard_sequences": 4, "batch_size": 4}
    b = EntryBuilder(root / "synthetic", "key", layout)
    start = 0
    for j, m in enumerate(shard_rows):
        ids = np.arange(start, start + m)
        x = np.zeros((m, d), np.float16)
        x[:, 0], x[:, 1], x[:, 2:] = ids // 1000, ids % 1000, 0.5
        w = b.writer(j)
        w.write(x[:m // 2])  # streamed in pieces, as a capture writes
        w.write(x[m // 2:])
        b.record(j, w.close())
        start += m
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, start), n_docs - 1,
                                                        replace=False))
    docs = np.stack([np.arange(n_docs), np.r_[0, cuts], np.r_[cuts, start]], axis=1)
    b.finish(docs, {"synthetic": True})
    return open_entry(root / "synthetic", "key")


def _ids(x):
    return x[:, 0].astype(np.int64) * 1000 + x[:, 1].astype(np.int64)


def _rows(runs):
    return np.concatenate([np.arange(a, b) for a, b in runs])


@pytest.mark.parametrize("buffer", [10**6, 200, 37])
def test_reader_yields_each_train_row_once_per_epoch_never_validation(tmp_path, buffer):
    e = _synthetic(tmp_path)
    sp = e.split(0.25, seed=0)
    n = sp.n_train
    assert 0 < sp.n_val and n + sp.n_val == e.n_tokens
    src = EntryRows(e, sp.train, buffer)
    assert src.shape == (n, 8) and src.buffer_rows == min(buffer, n)
    batches = src.batches(64, seed=3)
    got = np.concatenate([_ids(next(batches)) for _ in range(3 * n // 64)])
    for epoch in range(2):  # every train row exactly once per epoch (batches straddle epochs)
        np.testing.assert_array_equal(np.sort(got[epoch * n:(epoch + 1) * n]), _rows(sp.train))
    assert not set(got.tolist()) & set(_rows(sp.val).tolist())
    assert not np.array_equal(got[:n], np.sort(got[:n]))  # shuffled
    again = EntryRows(e, sp.train, buffer).batches(64, seed=3)
    np.testing.assert_array_equal(got, np.concatenate([_ids(next(again))
                                                       for _ in range(3 * n // 64)]))
    other = EntryRows(e, sp.train, buffer).batches(64, seed=4)
    assert not np.array_equal(got[:64], _ids(next(other)))
    assert next(EntryRows(e, sp.train, buffer).batches(64, seed=3)).dtype == np.float32
    sample = _ids(src.sample(100, np.random.default_rng(0)))
    assert len(set(sample.tolist())) == 100
    assert set(sample.tolist()) <= set(_rows(sp.train).tolist())
    np.testing.assert_array_equal(sample, _ids(src.sample(100, np.random.default_rng(0))))


def test_reader_reads_only_the_shards_it_needs(tmp_path):
    e = _synthetic(tmp_path, shard_rows=(500,) * 8, n_docs=80)
    sp = e.split(0.1, seed=0)
    shards.VERIFIED_SHARDS.clear()
    checked = lambda: sum((*e.inodes[j], s["sha256"]) in shards.VERIFIED_SHARDS  # noqa: E731
                          for j, s in enumerate(e.manifest["shards"]))
    src = EntryRows(e, sp.train, buffer_tokens=100)  # a window: ~400 rows, one shard
    src.sample(50, np.random.default_rng(0))  # from shards holding 4 x 50 rows: one
    assert checked() == 1
    batches = src.batches(32, seed=0)
    for _ in range(5):
        next(batches)
    assert checked() <= 2  # a training window is local
    e.validation(sp, max_tokens=20)
    assert checked() <= 3


def test_array_rows_match_the_in_ram_permutation():
    x = np.arange(1000, dtype=np.float32).reshape(-1, 2).repeat(2, axis=1)
    rows = ArrayRows(x)
    got = np.concatenate([next(b)[:, 0] for b in [rows.batches(50, 0)] for _ in range(10)])
    assert sorted(got.tolist()) == sorted(x[:, 0].tolist())


def test_two_processes_read_one_entry_through_the_page_cache(tmp_path):
    """Opening maps the shards (no copy); two processes each reading an epoch and the
    validation set of a 41 MB entry grow by less than an eighth of it (0.4 MB measured; a
    copy in RAM grew 64 MB, leaving the read pages mapped 15 MB): no private copy, and no
    file pages left in either's resident set."""
    e = _synthetic(tmp_path, shard_rows=(10_000,) * 4, d=512)
    assert all(isinstance(s, np.memmap) for s in e.shards)
    size = sum(s.nbytes for s in e.shards)
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from saelab.batches import EntryRows
        from saelab.entry import open_entry
        e = open_entry(Path(sys.argv[1]), "key")
        sp = e.split(0.1, seed=0)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        batches = EntryRows(e, sp.train, 2048).batches(512, seed=0)
        rows = sum(len(next(batches)) for _ in range(-(-sp.n_train // 512)))
        e.validation(sp, max_tokens=2048)
        print(rows >= sp.n_train, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(e.path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        whole, grew_kb = p.communicate(timeout=120)[0].split()
        assert p.returncode == 0 and whole == "True"
        assert int(grew_kb) * 1024 < size / 8, (grew_kb, size)
