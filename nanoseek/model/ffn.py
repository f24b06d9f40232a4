"""Dense feed-forward blocks: SwiGLU (gated SiLU, the LLaMA / DeepSeek default) and ReLU² (modded-nanogpt)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ReLU2(nn.Module):
    """down(relu(up(x))²)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return (SwiGLU if cfg.ffn == "swiglu" else ReLU2)(cfg.d_model, cfg.hidden)
