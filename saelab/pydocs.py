"""Build the default corpus ``pydocs``: Python's own documentation as a JSONL file.

The documents are the language-reference topics (``pydoc_data.topics``) and the
docstrings of the public standard-library modules, one document per topic or
module, split on paragraph boundaries when long. They are collected in a clean
interpreter (``-I -S``: no site-packages, so third-party shims such as setuptools'
``distutils`` cannot change them), so the corpus is identical wherever the Python
version is, and it needs no download. ``saelab.data`` loads it like any other source.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from saelab.paths import atomic_write_text, cache_root

MAX_DOC_CHARS = 4000
"""Long topics and modules are split into documents of at most this many
characters (on paragraph boundaries), so the document-level split is fine-grained."""

# Modules never imported while collecting docstrings: side effects on import
# (antigravity opens a browser, this prints), GUI toolkits, and test suites.
_SKIP = ("antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "test", "tests",
         "idle_test", "lib2to3", "ensurepip", "pydoc_data", "encodings", "xxlimited", "xxsubtype")


def _collect(skip: tuple[str, ...]) -> None:
    """Print ``[source, text]`` JSON lines: pydoc topics, then docstrings per module.

    Runs in a separate clean interpreter (see ``corpus_path``), so importing
    hundreds of stdlib modules leaves the caller untouched. Self-contained.
    """
    import importlib
    import inspect
    import json
    import pkgutil
    import sys
    import warnings

    from pydoc_data.topics import topics

    warnings.simplefilter("ignore")

    def public(name: str) -> bool:
        return not any(p.startswith("_") or p in skip for p in name.split("."))

    modules = []
    for top in sorted(n for n in sys.stdlib_module_names if public(n)):
        try:
            mod = importlib.import_module(top)
        except BaseException:  # platform-specific or optional modules
            continue
        modules.append(top)
        path = getattr(mod, "__path__", [])
        for info in pkgutil.walk_packages(path, top + ".", onerror=lambda _: None):
            if public(info.name):
                try:
                    importlib.import_module(info.name)
                    modules.append(info.name)
                except BaseException:
                    pass

    out = sys.stdout
    for key in sorted(topics):
        out.write(json.dumps([f"topic:{key}", topics[key]]) + "\n")
    seen_ids: set[int] = set()
    seen_docs: set[str] = set()
    for name in sorted(set(modules)):
        docs = []

        def add(obj: object) -> None:
            if id(obj) in seen_ids:
                return
            seen_ids.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc and doc.strip() and doc not in seen_docs:
                seen_docs.add(doc)
                docs.append(doc.strip())

        mod = sys.modules[name]
        add(mod)
        for attr, value in sorted(vars(mod).items()):
            if attr.startswith("_") or inspect.ismodule(value):
                continue
            if inspect.isclass(value):
                add(value)
                for member, sub in sorted(vars(value).items()):
                    if not member.startswith("_"):
                        add(getattr(sub, "__func__", sub))
            elif callable(value):
                add(value)
        if docs:
            out.write(json.dumps([f"module:{name}", "\n\n".join(docs)]) + "\n")


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Split ``text`` on blank lines into chunks of at most ``max_chars`` (a
    single longer paragraph stays whole)."""
    chunks: list[str] = []
    current = ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


@lru_cache(maxsize=1)
def corpus_path() -> Path:
    """Build (or find) the pydocs corpus JSONL; its name holds the content hash."""
    import inspect

    script = inspect.getsource(_collect) + f"\n_collect({_SKIP!r})\n"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True,
                          text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"collecting the pydocs corpus failed:\n{proc.stderr[-2000:]}")
    lines = []
    for line in proc.stdout.splitlines():
        source, text = json.loads(line)
        for i, chunk in enumerate(split_paragraphs(text, MAX_DOC_CHARS)):
            lines.append(json.dumps({"text": chunk, "source": f"{source}#{i}"}, ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_root() / "corpora" / f"pydocs-{version}-{digest}.jsonl"
    if not path.exists():
        atomic_write_text(path, body)
    return path
