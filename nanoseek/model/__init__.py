"""The nanoseek model: a transformer LM with plain, HC or mHC residual connections and a dense or DeepSeekMoE FFN."""

from nanoseek.model.attention import KVCache
from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import MoE, moe_stats
from nanoseek.model.residual import HyperConnection, ManifoldHyperConnection, PlainResidual, sinkhorn
from nanoseek.model.transformer import Transformer

__all__ = [
    "HyperConnection",
    "KVCache",
    "ManifoldHyperConnection",
    "ModelConfig",
    "MoE",
    "PlainResidual",
    "Transformer",
    "moe_stats",
    "sinkhorn",
]
