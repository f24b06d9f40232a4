"""nanoseek: DeepSeek's recipe for training capable language models cheaply, small and measured."""

from nanoseek.openmp import choose_openmp

choose_openmp()  # before torch is imported: OpenMP reads its environment once

from nanoseek.model import KVCache, Transformer  # noqa: E402
from nanoseek.model.config import ModelConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KVCache", "ModelConfig", "Transformer", "__version__"]
