"""The data config: which text a model learns from and how it becomes tokens (DESIGN.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.schema import check_choice, require

TOKENIZERS = ("byte", "bpe", "hf")


@dataclass
class DataConfig:
    """What text the model learns from and how it becomes tokens (DESIGN.md §7)."""

    source: str = "python-docs"
    """python-docs (the running CPython's own documentation: pydoc topics + stdlib docstrings, no download), or a
    path to a UTF-8 text file or a folder of text files."""
    tokenizer: str = "byte"
    """byte (vocab 256, no training), bpe (trained on the train split with the `tokenizers` library), or hf (the
    tokenizer of a Hugging Face model loaded with --init hf:DIR, which comes with the model and is never trained)."""
    bpe_vocab_size: int = 1024
    """Vocabulary size of the BPE tokenizer (bpe only); model.vocab_size is set from the tokenizer."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation (whole documents chosen by a hash of their name, or the tail of
    a single document)."""

    def __post_init__(self) -> None:
        require(
            self.source.strip() != "", "source", self.source, "expected 'python-docs' or a path to a file or folder"
        )
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        require(256 < self.bpe_vocab_size <= 65536, "bpe_vocab_size", self.bpe_vocab_size, "expected 257..65536")
        require(0 < self.val_fraction < 0.5, "val_fraction", self.val_fraction, "expected a number in (0, 0.5)")
