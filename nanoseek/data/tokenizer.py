"""Tokenizers: byte-level (vocab 256, needs no training), BPE trained with the ``tokenizers`` library, and a
Hugging Face model's own tokenizer, used as it comes.

All expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``name`` and save / load to a
folder, so a checkpoint carries the tokenizer it was trained with.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

LONGEST_RUN = 64
"""Longest run of non-space (or of space) characters BPE training sees in one piece."""
_LONG_RUN = re.compile(rf"\S{{{LONGEST_RUN + 1},}}|\s{{{LONGEST_RUN + 1},}}")


def bounded_runs(text: str):
    """``text`` in pieces that end inside runs longer than LONGEST_RUN, every LONGEST_RUN characters (elsewhere
    untouched, so ordinary words and their leading spaces train as before)."""
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + LONGEST_RUN, run.end(), LONGEST_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]


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
        """Learn the merges. A run of one kind of character longer than LONGEST_RUN (a million 'a's, a wall of
        spaces) is cut into pieces first: BPE training is quadratic in the length of a pre-token. The training
        runs in a worker thread (the library releases the GIL) so that Ctrl-C stops it at once."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        pieces = [piece for text in texts for piece in bounded_runs(text)]
        failure: list[BaseException] = []

        def work() -> None:
            try:
                tok.train_from_iterator(pieces, trainer=trainer)
            except BaseException as err:  # handed to the main thread
                failure.append(err)

        worker = threading.Thread(target=work, name="bpe-training", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)  # a KeyboardInterrupt lands here; the daemon thread dies with the process
        if failure:
            raise failure[0]
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


class HFTokenizer:
    """A Hugging Face model's tokenizer as it comes: its ``tokenizer.json`` (a ``tokenizers.Tokenizer``) and its
    ``tokenizer_config.json`` (special tokens, chat template), kept verbatim so an exported model carries them back.

    ``encode`` adds no special tokens (no BOS): a prompt and its completion are encoded separately and joined, and a
    chat template writes the special tokens it wants; special tokens written in the text are recognised.
    ``decode`` keeps special tokens, so decode(encode(text)) == text. ``eos_id`` is the config's eos_token."""

    name = "hf"

    def __init__(self, tokenizer, config: dict):
        self._tok, self.config = tokenizer, config
        self.eos_id = self.special_id("eos_token")

    def special_id(self, key: str) -> int | None:
        """The id of the config's special token ``key`` (bos_token, eos_token, pad_token, ...), None if unset."""
        text = _token_text(self.config.get(key))
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json: {key}={text!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Read a Hugging Face folder's tokenizer.json, tokenizer_config.json and chat_template.jinja (if any)."""
        from tokenizers import Tokenizer

        path = Path(folder, "tokenizer.json")
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: only fast tokenizers (tokenizer.json) can be read; save one with transformers' "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
            )
        config_path = Path(folder, "tokenizer_config.json")
        config = _read_json(config_path) if config_path.is_file() else {}
        template = Path(folder, "chat_template.jinja")
        if template.is_file():
            config["chat_template"] = template.read_text(encoding="utf-8")
        return cls(Tokenizer.from_file(str(path)), config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the tokenizer's own chat template."""
        from nanoseek.data.chat_template import render_chat

        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        tokens = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return render_chat(self.chat_template, messages, add_generation_prompt, tokens)

    def save(self, folder: str | Path) -> None:
        """One file, so a checkpoint's hash covers the tokenizer and its config together."""
        raw = {"kind": "hf", "tokenizer": json.loads(self._tok.to_str()), "config": self.config}
        Path(folder, "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")

    def save_pretrained(self, folder: str | Path) -> None:
        """The Hugging Face layout: tokenizer.json and tokenizer_config.json, as they came."""
        self._tok.save(str(Path(folder, "tokenizer.json")))
        Path(folder, "tokenizer_config.json").write_text(json.dumps(self.config, indent=1, ensure_ascii=False))


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its content."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def prepare_text(data: bytes) -> tuple[str, int]:
    """Decode bytes for a text tokenizer: (text with U+FFFD for invalid sequences, number of invalid bytes)."""
    invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
    return data.decode("utf-8", errors="replace"), invalid


def load_tokenizer(folder: str | Path) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """The tokenizer saved in a checkpoint folder."""
    path = Path(folder, "tokenizer.json")
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint has no tokenizer")
    raw = _read_json(path)
    if raw.get("kind") == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    try:
        if raw.get("kind") == "hf":
            return HFTokenizer(Tokenizer.from_str(json.dumps(raw["tokenizer"])), dict(raw["config"]))
        return BPETokenizer(Tokenizer.from_file(str(path)))
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a tokenizer nanoseek can read: {str(err)[:200]}") from None
