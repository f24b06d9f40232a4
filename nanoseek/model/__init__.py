"""The nanoseek model: a transformer LM with plain, HC or mHC residual connections."""

from nanoseek.model.attention import KVCache
from nanoseek.model.residual import HyperConnection, ManifoldHyperConnection, PlainResidual, sinkhorn
from nanoseek.model.transformer import Transformer

__all__ = ["HyperConnection", "KVCache", "ManifoldHyperConnection", "PlainResidual", "Transformer", "sinkhorn"]
