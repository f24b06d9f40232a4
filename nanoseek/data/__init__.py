"""Data: the embedded corpus, user text, tokenizers, batching and verifiable reasoning tasks."""
