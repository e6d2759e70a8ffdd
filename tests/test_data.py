"""Corpora (pydocs, files, hub) and document-bounded packing: real files, the real tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import saelab  # noqa: F401  (before mlx)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from saelab import data, pydocs
from saelab.config import DataConfig
from saelab.gguf import ensure_default_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_default_model("float32")))


@pytest.fixture(scope="module")
def pydocs_texts():
    return data.load_texts(DataConfig())


def test_pydocs_is_a_large_real_english_corpus(pydocs_texts, tokenizer):
    chars = sum(map(len, pydocs_texts))
    assert len(pydocs_texts) > 500
    assert chars > 1_500_000
    assert all(len(t) >= 50 for t in pydocs_texts)
    assert max(map(len, pydocs_texts)) <= pydocs.MAX_DOC_CHARS or \
        all("\n\n" not in t for t in pydocs_texts if len(t) > pydocs.MAX_DOC_CHARS)
    words = " ".join(pydocs_texts).lower().split()
    assert words.count("the") > 10_000 and words.count("return") > 1_000
    assert any("assert statement" in t.lower() for t in pydocs_texts)  # a language-reference topic
    assert any("os.path" in t for t in pydocs_texts)  # a stdlib docstring
    tokens = sum(map(len, tokenizer(pydocs_texts, add_special_tokens=False)["input_ids"]))
    assert tokens > 400_000


@pytest.mark.slow  # collects the corpus again in a new interpreter
def test_pydocs_identity_is_deterministic_and_rebuilt_identically(tmp_path, monkeypatch):
    first = pydocs.corpus_path()
    ident = data.corpus_identity(DataConfig())
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    pydocs.corpus_path.cache_clear()
    try:
        rebuilt = pydocs.corpus_path()  # a fresh collection in a new interpreter
        assert rebuilt.parent == tmp_path / "corpora"
        assert rebuilt.name == first.name
        assert rebuilt.read_bytes() == first.read_bytes()
        assert data.corpus_identity(DataConfig()) == ident
    finally:
        pydocs.corpus_path.cache_clear()
    assert data.corpus_identity(DataConfig(min_chars=51)) != ident


def test_split_paragraphs_keeps_text_and_limit():
    text = "\n\n".join(f"para {i} " + "x" * 30 for i in range(20))
    chunks = pydocs.split_paragraphs(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "\n\n".join(chunks) == text


def _txt(path, blocks):
    path.write_text("\n\n".join(blocks) + "\n")
    return str(path)


def test_files_txt_jsonl_json_parquet(tmp_path):
    blocks = [f"Paragraph number {i} says something long enough to be kept as a document."
              for i in range(3)]
    txt = _txt(tmp_path / "a.txt", blocks + ["short"])
    jsonl = tmp_path / "b.jsonl"
    row = "JSON lines row {} with enough characters to pass the minimum length."
    jsonl.write_text("".join(json.dumps({"body": row.format(i)}) + "\n" for i in range(2)))
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"body": "A JSON array row with enough characters to pass it."}]))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["A parquet row with enough characters to pass the minimum.",
                                      None]}), parquet)

    assert data.load_texts(DataConfig(source="files", paths=[txt])) == blocks
    cfg = DataConfig(source="files", paths=[str(jsonl), str(js), str(parquet)], text_field="body")
    texts = data.load_texts(cfg)
    assert [t.split()[0] for t in texts] == ["JSON", "JSON", "A", "A"]
    assert texts[-1].startswith("A parquet row")
    ident = data.corpus_identity(cfg)
    assert ident == data.corpus_identity(cfg)
    jsonl.write_text(jsonl.read_text().replace("row 1", "row one"))
    assert data.corpus_identity(cfg) != ident  # content, not names, identifies files


def test_files_bad_input_is_a_clear_value_error(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"data\.paths=.*nope\.txt.*existing, readable file"):
        data.corpus_identity(DataConfig(source="files", paths=[missing]))
    with pytest.raises(ValueError, match=r"data\.paths=.*nope\.txt"):
        data.load_texts(DataConfig(source="files", paths=[missing]))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.paths=.*x\.csv.*\.txt, \.jsonl, \.json, \.parq"):
        data.load_texts(DataConfig(source="files", paths=[str(csv)]))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"data\.paths=.*broken\.parquet.*could not be read"):
        data.load_texts(DataConfig(source="files", paths=[str(broken)]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"content": "x" * 80}) + "\n")
    with pytest.raises(ValueError, match=r"data\.text_field='text'.*\['content'\]"):
        data.load_texts(DataConfig(source="files", paths=[str(rows)]))
    with pytest.raises(ValueError, match=r"data\.min_chars=1000"):
        data.load_texts(DataConfig(source="files", paths=[str(rows)], text_field="content",
                                   min_chars=1000))


def test_streamed_datasets_are_read_in_batches_and_checked(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(data, "READ_BATCH", 2)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"doc {i}", "n": i}) + "\n" for i in range(5)))
    streamed = datasets.load_dataset("json", data_files=str(rows), split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)  # the hub source's kind of dataset
    assert list(data._column(streamed, "body", "here")) == [f"doc {i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"data\.text_field='text' is not valid for here.*'body'"):
        data._column(streamed, "text", "here")

    def gen():
        yield from ({"body": f"doc {i}"} for i in range(3))

    unknown = datasets.IterableDataset.from_generator(gen)  # columns known only once read
    assert unknown.column_names is None
    assert list(data._column(unknown, "body", "here")) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(ValueError, match=r"data\.text_field='text'.*\['body'\]"):
        list(data._column(unknown, "text", "here"))


@pytest.mark.slow  # a subprocess
def test_hub_unreachable_is_a_clear_error():
    code = ("import saelab; from saelab.data import load_texts\n"
            "from saelab.config import DataConfig\n"
            "cfg = DataConfig(source='hub', name='wikitext', subset='wikitext-2-raw-v1')\n"
            "try:\n load_texts(cfg)\n"
            "except ValueError as e: print('VALUEERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert "VALUEERROR data.name='wikitext'" in out
    assert "data.source=pydocs" in out


def _unmasked(packed, i):
    return packed.tokens[i][packed.mask[i]]


def test_packing_is_document_bounded_and_masks_bos_padding_specials(tokenizer):
    texts = ["The first document is short.",
             "The second document is a good deal longer. " * 30,
             "A third one mentions <|im_end|> a special token in its text, and goes on a bit."]
    packed = data.pack_documents(tokenizer, texts, context_length=32, max_tokens=10_000)
    bos = tokenizer.bos_token_id
    assert packed.tokens.dtype == np.int32 and packed.tokens.shape[1] == 32
    assert (packed.tokens[:, 0] == bos).all() and not packed.mask[:, 0].any()
    special = set(tokenizer.all_special_ids)
    assert not any(t in special for t in packed.tokens[packed.mask])
    for doc, text in enumerate(texts):
        rows = np.flatnonzero(packed.doc_ids == doc)
        assert len(rows) > 0 and (np.diff(rows) == 1).all()  # contiguous, one document each
        got = np.concatenate([_unmasked(packed, i) for i in rows])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want = [t for t in ids if t not in special]
        assert got.tolist() == want
    assert packed.n_tokens == packed.mask.sum() == len(packed.token_doc_ids())
    # padding: the first document fits in one row, the rest of it is masked
    first = np.flatnonzero(packed.doc_ids == 0)[0]
    n_first = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert packed.mask[first].sum() == n_first and not packed.mask[first, 1 + n_first:].any()


def test_packing_stops_at_max_tokens(tokenizer, pydocs_texts):
    packed = data.pack_documents(tokenizer, pydocs_texts, context_length=128, max_tokens=3001)
    assert packed.n_tokens == 3001
    assert len(np.unique(packed.doc_ids)) > 1
    again = data.pack_documents(tokenizer, pydocs_texts, context_length=128, max_tokens=3001)
    assert np.array_equal(again.tokens, packed.tokens) and np.array_equal(again.mask, packed.mask)


def test_packing_without_bos():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "one", "two", "three"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    packed = data.pack_documents(tok, ["one two three one two", "three three"], context_length=4,
                                 max_tokens=100)
    assert packed.n_tokens == 7
    assert packed.mask[:, 0].all()  # no BOS: the first position is data
    rows = {doc: [_unmasked(packed, i).tolist() for i in np.flatnonzero(packed.doc_ids == doc)]
            for doc in (0, 1)}
    assert rows == {0: [[2, 3, 4, 2], [3]], 1: [[4, 4]]}
    assert (packed.tokens[~packed.mask] == vocab["[PAD]"]).all()


def test_bad_context_length(tokenizer):
    with pytest.raises(ValueError, match=r"data\.context_length=1"):
        data.pack_documents(tokenizer, ["some text here"], context_length=1, max_tokens=10)


def test_iter_texts_streams_and_checks_sources_up_front(tmp_path, pydocs_texts):
    stream = data.iter_texts(DataConfig())
    assert not isinstance(stream, list) and next(stream) == pydocs_texts[0]
    assert list(stream) == pydocs_texts[1:]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(os.urandom(256))
    good = _txt(tmp_path / "good.txt", ["A paragraph long enough to be kept as one document here."])
    with pytest.raises(ValueError, match=r"data\.paths=.*broken\.parquet"):  # before any text
        data.iter_texts(DataConfig(source="files", paths=[good, str(broken)]))
    short = data.iter_texts(DataConfig(source="files", paths=[good], min_chars=1000))
    with pytest.raises(ValueError, match=r"data\.min_chars=1000"):  # at the end of the stream
        list(short)


def test_pack_blocks_stream_in_blocks_equal_to_one_pack(tokenizer, pydocs_texts, monkeypatch):
    monkeypatch.setattr(data, "DOC_WINDOW", 64)  # a stream is held one window at a time
    whole = data.pack_documents(tokenizer, pydocs_texts, context_length=64, max_tokens=5000)
    consumed = []

    def stream():  # a one-pass stream that fails if read much past what the budget needs
        for i, t in enumerate(pydocs_texts):
            if i >= 300:
                raise AssertionError("read past the budget")
            consumed.append(i)
            yield t

    blocks = list(data.pack_blocks(tokenizer, stream(), 64, 5000, block_sequences=16))
    assert [len(b.tokens) for b in blocks[:-1]] == [16] * (len(blocks) - 1)
    assert 0 < len(blocks[-1].tokens) <= 16 and len(consumed) < 300
    joined = data.Packed.concat(blocks)
    for f in ("tokens", "mask", "doc_ids"):
        assert np.array_equal(getattr(joined, f), getattr(whole, f))
    runs = np.concatenate([b.doc_runs() for b in blocks])
    assert runs[:, 1].sum() == whole.n_tokens == 5000
    per_token = np.repeat(runs[:, 0], runs[:, 1])
    assert np.array_equal(per_token, whole.token_doc_ids())


def test_document_order_is_a_content_shuffle_per_window(tokenizer, monkeypatch):
    texts = [f"Document number {i} with a few words of its own." for i in range(10)]
    order = [i for i, _ in data._doc_order(texts)]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    monkeypatch.setattr(data, "DOC_WINDOW", 4)
    windowed = [i for i, _ in data._doc_order(texts)]
    assert [sorted(windowed[a:a + 4]) for a in (0, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sorted(windowed[8:]) == [8, 9]
    assert [i for i, _ in data._doc_order(iter(texts))] == windowed  # a stream: the same order
