import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # the interop tests build their models locally: never reach for a hub


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token and corpus caches go to a per-session folder, so tests never depend on a user's cache."""
    os.environ["NANOSEEK_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """About 60 kB of English prose from the Python docs, as a small corpus for fast training tests."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:40])[:60_000]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path
