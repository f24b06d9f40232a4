"""The embedded corpus, user text, tokenizers and deterministic batches."""

import numpy as np
import pytest
import torch

from nanoseek.data.config import DataConfig
from nanoseek.data.corpus import Corpus, load_corpus, python_docs
from nanoseek.data.loader import load_token_data, train_batch, val_batches
from nanoseek.data.tokenizer import ByteTokenizer, load_tokenizer, prepare_text


def test_python_docs_corpus_is_deterministic_and_described():
    a, b = python_docs(), python_docs()  # the second call reads the cache
    assert a.sha256 == b.sha256 and a.n_bytes == b.n_bytes
    assert a.n_bytes > 400_000  # pydoc topics alone are ~465k characters in 3.11
    assert a.documents[0][0].startswith("topics/")
    assert any(name.startswith("stdlib/") for name, _ in a.documents)
    meta = a.metadata()
    assert meta["corpus_sha256"] == a.sha256 and meta["python_version"]
    train, val = a.split(0.05)
    assert 0.01 < sum(map(len, val)) / a.n_bytes < 0.15
    assert len(train) + len(val) == len(a.documents)


def test_split_of_a_single_document_takes_the_tail_at_a_line_break():
    doc = b"".join(b"line %d\n" % i for i in range(100))
    train, val = Corpus("x", [("x", doc)]).split(0.1)
    assert train[0] + val[0] == doc
    assert train[0].endswith(b"\n") and 0.05 < len(val[0]) / len(doc) < 0.15


def test_folder_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n" * 50)
    (tmp_path / "a.md").write_text("first file\n" * 50)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    corpus = load_corpus(str(tmp_path))
    assert [name for name, _ in corpus.documents] == ["a.md", "b.txt"]


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither 'python-docs' nor an existing file"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(tmp_path))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than model.seq_len"):
        load_token_data(DataConfig(source=str(tmp_path / "short.txt")), seq_len=64)


def test_invalid_utf8_bytes_are_kept_by_bytes_and_counted_for_bpe(tmp_path):
    data = ("valid text " * 200).encode() + b"\xff\xfe broken \xc3" + ("more text " * 200).encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    byte = load_token_data(DataConfig(source=str(path)), seq_len=16)
    assert byte.metadata["invalid_utf8_bytes"] == 3
    assert 0xFF in np.asarray(byte.train) or 0xFF in np.asarray(byte.val)  # raw bytes survive
    assert prepare_text(b"a\xffb") == ("a\ufffdb", 1)
    bpe = load_token_data(DataConfig(source=str(path), tokenizer="bpe", bpe_vocab_size=300), seq_len=16)
    assert bpe.metadata["invalid_utf8_bytes"] == 3
    assert bpe.tokenizer.vocab_size <= 300


def test_bpe_round_trips_and_is_saved_and_reloaded(text_file, tmp_path):
    data = load_token_data(DataConfig(source=str(text_file), tokenizer="bpe", bpe_vocab_size=512), seq_len=32)
    tok = data.tokenizer
    text = "The with statement is used to wrap the execution of a block — naïve café."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges compress
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    again = load_token_data(DataConfig(source=str(text_file), tokenizer="bpe", bpe_vocab_size=512), seq_len=32)
    assert np.array_equal(again.train, data.train)  # cached arrays and tokenizer stay together


def test_train_batches_are_a_function_of_seed_step_and_micro(text_file):
    tokens = load_token_data(DataConfig(source=str(text_file)), seq_len=16).train
    x1, y1 = train_batch(tokens, 16, 4, seed=0, step=3, micro=0)
    x2, _ = train_batch(tokens, 16, 4, seed=0, step=3, micro=0)
    x3, _ = train_batch(tokens, 16, 4, seed=0, step=4, micro=0)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    # two processes with batch 2 see exactly the windows of one process with batch 4
    r0, _ = train_batch(tokens, 16, 2, seed=0, step=3, micro=0, rank=0, world=2)
    r1, _ = train_batch(tokens, 16, 2, seed=0, step=3, micro=0, rank=1, world=2)
    assert torch.equal(torch.cat([r0, r1]), x1)


def test_val_batches_are_fixed(text_file):
    tokens = load_token_data(DataConfig(source=str(text_file)), seq_len=16).val
    a = [x for x, _ in val_batches(tokens, 16, 2, 3)]
    b = [x for x, _ in val_batches(tokens, 16, 2, 3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
