"""nanoseek: DeepSeek's recipe for training capable language models cheaply, small and measured."""

from nanoseek.model import KVCache, Transformer
from nanoseek.model.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["KVCache", "ModelConfig", "Transformer", "__version__"]
