"""Token arrays and batches: a corpus and a tokenizer become two flat numpy arrays (train, val), cached on disk and
memory-mapped, from which fixed-length windows are drawn.

Training windows are a pure function of (seed, step, micro-batch): no sampler state to save, so resuming at step s
reads exactly the windows an uninterrupted run would have read. Each step draws one global batch of
``world × batch_size`` windows and process r takes its slice, so N processes see the same data as one process with
an N-times larger batch. Validation uses the same evenly spaced windows at every evaluation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.cache import cache_dir
from nanoseek.data.config import DataConfig
from nanoseek.data.corpus import Corpus, load_corpus
from nanoseek.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, prepare_text


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: ByteTokenizer | BPETokenizer
    metadata: dict


def _encode(docs: list[bytes], tokenizer) -> np.ndarray:
    """Concatenate documents (separated by a newline) into one token array."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(b"\n".join(docs), dtype=np.uint8).copy()
    ids = [i for doc in docs for i in tokenizer.encode(prepare_text(doc)[0] + "\n")]
    return np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)


def _cached(path: Path, build) -> np.ndarray:
    """np.load(mmap) of a cached array, building and writing it atomically on a miss."""
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except ValueError:
            pass  # a damaged cache file is rebuilt
    array = build()
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _tokenizer(cfg: DataConfig, train_docs: list[bytes], folder: Path) -> ByteTokenizer | BPETokenizer:
    """The byte tokenizer, or the BPE tokenizer trained on the train split (cached beside its token arrays, so the
    arrays always match the tokenizer that made them)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "hf":
        raise ValueError("data.tokenizer='hf' comes with a Hugging Face model (--init hf:DIR); a corpus is tokenized "
                         "here with 'byte' or 'bpe'")  # fmt: skip
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    tokenizer = BPETokenizer.train([prepare_text(d)[0] for d in train_docs], cfg.bpe_vocab_size)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tmp)
    os.replace(tmp / "tokenizer.json", folder / "tokenizer.json")
    tmp.rmdir()
    return tokenizer


def _tokenizer_hash(tokenizer) -> str:
    """SHA-256 of a tokenizer's saved form."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return hashlib.sha256(Path(tmp, "tokenizer.json").read_bytes()).hexdigest()


def load_token_data(cfg: DataConfig, seq_len: int, corpus: Corpus | None = None, tokenizer=None) -> TokenData:
    """Load the corpus, make (or reuse) the tokenizer, and return the train and val token arrays. ``tokenizer``:
    use this one (a resumed run's, from its checkpoint) instead of the configured or a freshly trained one."""
    corpus = corpus or load_corpus(cfg.source)
    train_docs, val_docs = corpus.split(cfg.val_fraction)
    kind = cfg.tokenizer if tokenizer is None else f"given:{_tokenizer_hash(tokenizer)}"
    key = f"{corpus.sha256}|{kind}|{cfg.bpe_vocab_size}|{cfg.val_fraction}"
    folder = cache_dir() / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    folder.mkdir(exist_ok=True)
    tokenizer = tokenizer or _tokenizer(cfg, train_docs, folder)
    train = _cached(folder / "train.npy", lambda: _encode(train_docs, tokenizer))
    val = _cached(folder / "val.npy", lambda: _encode(val_docs, tokenizer))
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"data.source={cfg.source!r}: the {split} split has {len(tokens)} tokens, fewer than "
                f"model.seq_len + 2 = {seq_len + 2}; use more text, a shorter seq_len or a larger data.val_fraction"
            )
    metadata = corpus.metadata() | {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
        # the byte tokenizer keeps invalid bytes as tokens; BPE sees U+FFFD in their place
        "invalid_utf8_bytes": sum(prepare_text(d)[1] for _, d in corpus.documents),
    }
    return TokenData(train, val, tokenizer, metadata)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (B, T) inputs, y: (B, T) the next tokens
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    chunk = torch.from_numpy(rows)
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int, micro: int, rank: int = 0, world: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of process ``rank`` for (step, micro-batch): its slice of one global batch drawn from
    ``np.random.default_rng((seed, step, micro))``."""
    rng = np.random.default_rng((seed, step, micro))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=world * batch_size)
    return _windows(tokens, starts[rank * batch_size : (rank + 1) * batch_size], seq_len)


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, rank: int = 0, world: int = 1):
    """``n_batches`` batches of evenly spaced windows over the validation tokens, the same at every evaluation.
    With several processes the ``world × n_batches × batch_size`` windows are dealt out among them."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, num=world * n_batches * batch_size).astype(np.int64)
    starts = starts[rank::world]
    for i in range(n_batches):
        yield _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], seq_len)
