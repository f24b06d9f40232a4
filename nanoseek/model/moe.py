"""DeepSeekMoE (DESIGN.md §4): shared experts + fine-grained routed experts, sigmoid routing balanced by a bias
instead of an auxiliary loss, dropless dispatch.

DeepSeek-V3 (arXiv 2412.19437, §2.1.2, Eq. 12-16), for a token u (C):

    s_i = sigmoid(u · e_i)                             affinity to routed expert i (router kept in fp32)
    S   = TopK_i(s_i + b_i, k)                          b_i: balancing bias, used only to choose
    g_i = route_scale · s_i / Σ_{j∈S} s_j,  i ∈ S     gate weights come from the affinities alone
    y   = Σ_shared FFN_j(u) + Σ_{i∈S} g_i · FFN_i(u)

Auxiliary-loss-free balancing: after every optimizer step, b_i <- b_i + γ · sign(mean load - load_i), where load_i
counts the tokens expert i received since the previous step (summed over micro-batches and data-parallel ranks by
the training engine, which then calls ``MoE.update_bias``: the model never communicates). Padding tokens are
neither counted nor part of the sequence-wise balance loss (Eq. 17-20, ``sequence_balance_loss``), which may stay on.

Dropless: every token reaches its k experts. Token-expert pairs are sorted by expert so that each expert's tokens
are contiguous, then each expert matrix multiplies its rows: with one ``torch.nn.functional.grouped_mm`` call over
all experts ("grouped"), or one matmul per expert ("loop", the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.ffn import SwiGLU, swiglu
from nanoseek.model.residual_kernels import autocast_off, upcast


def sequence_balance_loss(
    affinity: torch.Tensor, chosen: torch.Tensor, alpha: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (Eq. 17-20), averaged over the sequences of a batch:

        L = α Σ_i f_i P_i,   f_i = N_r / (k T) · #{t : i ∈ S_t},   P_i = 1/T Σ_t s_{i,t} / Σ_j s_{j,t}

    f_i (the fraction of the sequence's choices that went to expert i, scaled to 1 when balanced) carries no
    gradient; P_i does, and pushes affinity away from over-chosen experts. Balanced routing gives L = α.
    affinity: (B, T, E) sigmoid affinities; chosen: (B, T, k) chosen expert ids; valid: (B, T) bool, the real
    tokens (padding is left out of f, P and T; a sequence with no real token is left out of the mean)."""
    b, t, e = affinity.shape
    k = chosen.shape[-1]
    w = torch.ones(b, t, device=affinity.device, dtype=affinity.dtype) if valid is None else valid.to(affinity.dtype)
    n = w.sum(dim=1)  # (B,) real tokens per sequence
    counts = torch.zeros(b, e, device=chosen.device, dtype=affinity.dtype)
    counts.scatter_add_(1, chosen.flatten(1), w[..., None].expand(b, t, k).flatten(1))
    per_token = n.clamp(min=1)[:, None]
    f = counts * e / (k * per_token)  # (B, E)
    p = ((affinity / affinity.sum(dim=-1, keepdim=True)) * w[..., None]).sum(dim=1) / per_token  # (B, E)
    per_sequence = (f * p).sum(dim=-1)  # (B,)
    has_tokens = (n > 0).to(affinity.dtype)
    return alpha * (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


class RoutedExperts(nn.Module):
    """N_r SwiGLU experts stored as stacked matrices, gate_up: (E, C, 2H), down: (E, H, C), so that expert e maps
    rows x (n, C) to swiglu(x @ gate_up[e]) @ down[e] — the layout grouped_mm takes."""

    matmul_weights = ("gate_up", "down")  # cast to autocast's dtype at every use (Transformer.autocast_weight_names)

    def __init__(self, n_experts: int, dim: int, hidden: int, dispatch: str, init_std: float = 0.02):
        super().__init__()
        self.dispatch = dispatch
        self.gate_up = nn.Parameter(torch.randn(n_experts, dim, 2 * hidden) * init_std)
        self.down = nn.Parameter(torch.randn(n_experts, hidden, dim) * init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, C) rows sorted by expert; counts: (E,) rows per expert, summing to M -> (M, C)."""
        device = x.device.type
        # grouped_mm ignores autocast, so cast by hand: both paths then compute in the same dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if self.dispatch == "grouped" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"moe_dispatch='grouped' is invalid for {dtype}: torch.nn.functional.grouped_mm takes float32, "
                "bfloat16 or float16; use moe_dispatch='loop'"
            )
        x, gate_up, down = x.to(dtype), self.gate_up.to(dtype), self.down.to(dtype)
        if self.dispatch == "grouped":
            return _grouped_experts(x, gate_up, down, counts)
        groups = zip(x.split(counts.tolist()), gate_up, down, strict=True)
        return torch.cat([swiglu(xe @ w1) @ w2 for xe, w1, w2 in groups])


@torch.compiler.disable  # torch 2.13's meta kernel of grouped_mm accepts bf16 only: run it eagerly under compile
def _grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group; the last is M
    return F.grouped_mm(swiglu(F.grouped_mm(x, gate_up, offs=offsets)), down, offs=offsets)


class MoE(nn.Module):
    """DeepSeekMoE FFN: x (B, T, C) -> (B, T, C). See the module docstring for the equations.

    State: ``expert_bias`` (E,) is a persistent buffer (saved and restored with the weights). ``load`` (E,) counts
    real tokens per expert in training mode since the last ``update_bias``; it is a plain tensor, not a buffer, because
    DistributedDataParallel re-broadcasts buffers from rank 0 before every forward and would overwrite each rank's
    own counts. It is zero after every optimizer step, so a checkpoint taken there needs nothing else to resume.
    ``last_load`` keeps the global counts of the last update for ``moe_stats``; ``aux_loss`` holds the balance loss
    of the last training forward (None otherwise) for the model to add to its loss."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_experts, self.top_k, self.route_scale = cfg.n_routed_experts, cfg.top_k, cfg.route_scale
        self.gamma, self.alpha = cfg.bias_update_rate, cfg.seq_aux_loss
        self.router = nn.Linear(cfg.d_model, cfg.n_routed_experts, bias=False)  # rows are the centroids e_i
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.d_model, cfg.expert_width, cfg.moe_dispatch, cfg.init_std
        )
        # N_s shared experts of width H are exactly one SwiGLU of width N_s·H (their hidden units concatenate)
        n_shared = cfg.n_shared_experts
        self.shared = SwiGLU(cfg.d_model, n_shared * cfg.expert_width) if n_shared else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))
        self.load = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
        self.last_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (..., C) -> gate weights (..., k) fp32, chosen experts (..., k), affinities (..., E) fp32."""
        with autocast_off(x.device.type):
            affinity = torch.sigmoid(F.linear(upcast(x), upcast(self.router.weight)))
            chosen = torch.topk(affinity + self.expert_bias.to(affinity.dtype), self.top_k, dim=-1).indices
            s = affinity.gather(-1, chosen)
            weights = self.route_scale * s / s.sum(dim=-1, keepdim=True)
        return weights, chosen, affinity

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, C); valid: (B, T) bool, the real tokens (None: all). Padding is routed and computed like any
        # token (its output is never used) but not counted in the loads or the balance loss.
        weights, chosen, affinity = self.route(x)
        use_aux = self.training and self.alpha
        self.aux_loss = sequence_balance_loss(affinity, chosen, self.alpha, valid) if use_aux else None
        flat = chosen.flatten()  # (N·k,) expert of every token-expert pair, N = B·T
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        if self.training:
            real = flat if valid is None else chosen[valid].flatten()
            self.load = self.load.to(counts.device) + torch.bincount(real, minlength=self.n_experts)
        order = flat.argsort(stable=True)  # pairs grouped by expert
        token = order // self.top_k  # (N·k,) token of each sorted pair
        xf = x.reshape(-1, x.shape[-1])  # (N, C)
        # index_select, not xf[token]: its backward is one index_add instead of an accumulating index_put
        y = self.experts(xf.index_select(0, token), counts)  # (N·k, C), sorted by expert
        y = y * weights.flatten().index_select(0, order).unsqueeze(-1).to(y.dtype)
        # the routed outputs are added onto the shared experts' (or zeros): no separate sum of the two
        base = self.shared(xf) if self.shared is not None else torch.zeros_like(xf, dtype=y.dtype)
        out = base.to(y.dtype).index_add(0, token, y)
        return out.view(x.shape[:-1] + (out.shape[-1],))

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step: b_i <- b_i + γ·sign(mean load - load_i) with ``load`` (E,) the token counts of
        the step (summed over micro-batches and processes by the caller), then reset the local counts."""
        if self.expert_bias.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"expert_bias dtype={self.expert_bias.dtype} is invalid: bias updates of γ={self.gamma} need float32 "
                "or float64; keep the model in float32 and train under autocast"
            )
        self.last_load = load.detach().cpu()
        load = load.to(self.expert_bias.device, self.expert_bias.dtype)
        self.expert_bias += self.gamma * torch.sign(load.mean() - load)
        self.load = torch.zeros_like(self.load)


def moe_stats(model: nn.Module) -> dict[str, float | list[float]]:
    """Expert loads of the last optimizer step (the global counts ``update_bias`` used, identical on every rank),
    for every MoE layer of ``model``: ``moe_layer{i}_load`` = fraction of token-expert pairs per expert,
    ``moe_layer{i}_max_violation`` = max_i load_i / mean load - 1 (0 = perfectly balanced, E/k - 1 = all tokens on
    the same k experts), and ``moe_max_violation`` over all layers. Empty before the first update. Costs nothing:
    no communication, a few numbers per layer."""
    stats: dict[str, float | list[float]] = {}
    worst = 0.0
    for m in model.modules():
        if not isinstance(m, MoE) or m.last_load is None:
            continue
        total = int(m.last_load.sum())
        fraction = m.last_load.double() / max(total, 1)
        violation = float(fraction.max()) * m.n_experts - 1 if total else 0.0
        stats[f"moe_layer{m.layer_index}_load"] = fraction.tolist()
        stats[f"moe_layer{m.layer_index}_max_violation"] = violation
        worst = max(worst, violation)
    if stats:
        stats["moe_max_violation"] = worst
    return stats
