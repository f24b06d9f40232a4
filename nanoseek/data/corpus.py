"""Text to learn from, without downloads: the embedded Python documentation corpus, or the user's own files.

A corpus is a list of named documents (raw bytes). The embedded one is extracted deterministically from the running
CPython: ``pydoc_data.topics`` (the language reference topics, ≈465k characters in 3.11) followed by the docstrings
of the standard library's modules, classes and functions, read with ``ast`` (nothing is imported), in sorted path
order. Its SHA-256, size and the Python version go into every run's metadata, because another Python gives another
corpus. The train / validation split is a fixed rule: whole documents chosen by a hash of their name, or the tail of
a lone document.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cache import cache_dir
from nanoseek.memory import available_memory, gib

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".json", ".csv", ".toml", ".yaml", ".yml"}
TEXT_MEMORY_FACTOR = 8
"""Memory per byte of text while a corpus is read and tokenized (the bytes, the decoded text, the token arrays)."""
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}


@dataclass
class Corpus:
    name: str
    documents: list[tuple[str, bytes]]
    """(document name, raw bytes), in a fixed order."""

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, data in self.documents:
            h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little") + data)
        return h.hexdigest()

    @property
    def n_bytes(self) -> int:
        return sum(len(d) for _, d in self.documents)

    def split(self, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
        """(train, val) documents. Several documents: a document is held out when the hash of its name falls in
        the first ``val_fraction`` of the hash range (at least one is held out). One document: its last
        ``val_fraction`` of bytes, cut at a line break when there is one."""
        if len(self.documents) == 1:
            data = self.documents[0][1]
            cut = int(len(data) * (1 - val_fraction))
            newline = data.rfind(b"\n", 0, cut)
            cut = newline + 1 if newline > len(data) // 2 else cut
            return [data[:cut]], [data[cut:]]
        held = [_hash_fraction(name) < val_fraction for name, _ in self.documents]
        if not any(held):
            held[-1] = True
        train = [d for (_, d), h in zip(self.documents, held, strict=True) if not h]
        val = [d for (_, d), h in zip(self.documents, held, strict=True) if h]
        return train, val

    def metadata(self) -> dict:
        return {
            "corpus": self.name,
            "corpus_sha256": self.sha256,
            "corpus_bytes": self.n_bytes,
            "corpus_documents": len(self.documents),
            "python_version": platform.python_version(),
        }


def _hash_fraction(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _docstrings(node: ast.AST) -> list[str]:
    """Docstrings of a module and its classes and functions, in source order."""
    doc = ast.get_docstring(node)
    out = [doc] if doc else []
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.extend(_docstrings(child))
    return out


def extract_python_docs() -> list[tuple[str, bytes]]:
    """The embedded corpus, freshly extracted (a few seconds; ``python_docs`` caches it)."""
    from pydoc_data.topics import topics

    documents = [(f"topics/{key}", topics[key].encode("utf-8")) for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_DIRS for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (test data for parsers)
        docs = _docstrings(tree)
        if docs:
            documents.append((f"stdlib/{rel.as_posix()}", ("\n\n".join(docs) + "\n").encode("utf-8")))
    return documents


def python_docs() -> Corpus:
    """The running Python's documentation as a corpus, cached per Python version."""
    cached = cache_dir() / f"python-docs-{platform.python_version()}.json"
    if cached.is_file():
        try:
            documents = [(n, t.encode("utf-8")) for n, t in json.loads(cached.read_text(encoding="utf-8"))]
            return Corpus("python-docs", documents)
        except (ValueError, TypeError):
            pass  # a damaged cache is rebuilt below
    documents = extract_python_docs()
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([(n, d.decode("utf-8")) for n, d in documents]), encoding="utf-8")
    os.replace(tmp, cached)
    return Corpus("python-docs", documents)


def text_files(path: str | Path) -> Corpus:
    """A UTF-8 text file, or every text file under a folder (by suffix, sorted), as raw bytes: invalid UTF-8 is
    kept here and handled by the tokenizer."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data.source={str(path)!r}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in it")
    else:
        raise ValueError(f"data.source={str(path)!r} is neither 'python-docs' nor an existing file or folder")
    size = sum(p.stat().st_size for p in files)
    if TEXT_MEMORY_FACTOR * size > available_memory():
        raise ValueError(
            f"data.source={str(path)!r} holds {gib(size)} of text; reading and tokenizing it takes about "
            f"{gib(TEXT_MEMORY_FACTOR * size)} of memory (estimated), more than the {gib(available_memory())} "
            "available; train on a part of it"
        )
    documents = [(p.relative_to(path).as_posix() if p != path else p.name, p.read_bytes()) for p in files]
    documents = [(n, d) for n, d in documents if d]
    if not documents:
        raise ValueError(f"data.source={str(path)!r} is empty")
    return Corpus(str(path), documents)


def load_corpus(source: str) -> Corpus:
    return python_docs() if source == "python-docs" else text_files(source)
