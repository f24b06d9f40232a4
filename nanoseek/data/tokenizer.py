"""Tokenizers: byte-level (vocab 256, needs no training) and BPE trained with the ``tokenizers`` library.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``name`` and save / load to a
folder, so a checkpoint carries the tokenizer it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255. Decoding replaces invalid byte sequences with U+FFFD."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes, valid UTF-8 or not, are already tokens."""
        return list(data)

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        Path(folder, "tokenizer.json").write_text(json.dumps({"kind": "byte"}))
