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

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        Path(folder, "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class BPETokenizer:
    """Byte-level BPE trained with the ``tokenizers`` library: any byte sequence is representable, merges learned
    on the training split. Invalid UTF-8 in the input is decoded with replacement characters (counted by
    ``prepare_text``)."""

    name = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, folder: str | Path) -> None:
        self._tok.save(str(Path(folder, "tokenizer.json")))


def prepare_text(data: bytes) -> tuple[str, int]:
    """Decode bytes for a text tokenizer: (text with U+FFFD for invalid sequences, number of invalid bytes)."""
    invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
    return data.decode("utf-8", errors="replace"), invalid


def load_tokenizer(folder: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved in a checkpoint folder."""
    path = Path(folder, "tokenizer.json")
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint has no tokenizer")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if raw.get("kind") == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(path)))
