"""Dense feed-forward blocks: SwiGLU (gated SiLU, the LLaMA / DeepSeek default) and ReLU² (modded-nanogpt)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the concatenated projections (..., 2H) -> (..., H); shared with the MoE experts."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    matmul_weights = ("gate_up.weight", "down.weight")  # autocast matmuls only (Transformer.autocast_weight_names)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))


class ReLU2(nn.Module):
    """down(relu(up(x))²)."""

    matmul_weights = ("up.weight", "down.weight")  # autocast matmuls only (Transformer.autocast_weight_names)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def make_ffn(cfg: ModelConfig) -> nn.Module:
    """The dense FFN of ``cfg``; an MoE model's dense blocks (below first_k_dense) use SwiGLU like its experts."""
    return (ReLU2 if cfg.ffn == "relu2" else SwiGLU)(cfg.d_model, cfg.hidden)
