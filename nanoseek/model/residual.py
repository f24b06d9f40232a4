"""Residual connections: the plain pre-norm residual, Hyper-Connections (HC) and Manifold-Constrained HC (mHC).

All three wrap a block function F: (..., C) -> (..., C) that runs once per token. HC and mHC carry n residual
streams per token, x: (..., n, C), and implement (DESIGN.md §3)

    x_{l+1} = H_res · x_l + H_postᵀ · F(RMSNorm(H_pre · x_l))

with H_pre, H_post in R^{1×n} and H_res in R^{n×n}. They differ in how the coefficients are made:
  * HC (arXiv 2409.19606): static parameters plus s · tanh(RMSNorm(x_stream) · W), per stream.
  * mHC (arXiv 2512.24880, Eq. 7-9): one linear map of the RMS-normalised flattened streams, scalar gates α, static
    biases b; H_pre = σ(·), H_post = 2σ(·), H_res = Sinkhorn-Knopp(·), a (nearly) doubly stochastic matrix.
Coefficients and stream mixing are computed in float32 even under bf16 autocast: they are tiny and the doubly
stochastic constraint is what keeps the composite map across depth bounded.

The four stream functions below are the equations as written; the modules run their fused equivalents from
residual_kernels.py (``site.ops = READABLE`` switches a site back to these, e.g. to try a change to the maths).
Every residual kind is a class that also reports what the rest of the code needs to know about it: its parameter
count and FLOPs from the config, its coefficient parameters (never weight-decayed) and its mixing matrix H_res
(for the gain diagnostics). ``RESIDUALS`` maps the config's ``residual`` string to the class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import residual_kernels as kernels
from nanoseek.model.config import ModelConfig
from nanoseek.model.residual_kernels import autocast_off, upcast

__all__ = ["RESIDUALS", "HyperConnection", "ManifoldHyperConnection", "PlainResidual", "make_residual", "upcast"]

# ---------------------------------------------------------------------------------------------------------------------
# The equations, readable


def sinkhorn(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on (..., n, n): M = exp(logits - max), then n_iters rounds of column then row normalisation.
    Rows sum to 1 exactly (they are normalised last), columns approximately. ``tiny`` keeps a column of underflowed
    zeros (huge logits) at zero instead of 0/0."""
    tiny = torch.finfo(logits.dtype).tiny
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(n_iters):
        for dim in (-2, -1):  # columns, then rows
            m = m / (m.sum(dim=dim, keepdim=True) + tiny)
    return m


# The fused versions also take a ``replay`` (block recompute, see Streams); here autograd keeps what it needs.


def rms_projection(v: torch.Tensor, phi: torch.Tensor, eps: float, replay: tuple = ()) -> torch.Tensor:
    """RMSNorm(v) · φ with a scale-free RMSNorm: v (..., D), phi (D, k) -> (..., k)."""
    return F.rms_norm(v, (v.shape[-1],), eps=eps) @ phi


def read_streams(x: torch.Tensor, h_pre: torch.Tensor, weight: torch.Tensor, eps: float, replay: tuple = ()):
    """F's input RMSNorm(H_pre · x) with gain ``weight``: x (..., n, C), h_pre (..., n) -> (..., C)."""
    return F.rms_norm(torch.einsum("...n,...nc->...c", h_pre, x), (x.shape[-1],), weight, eps)


def mix_streams(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor, replay: tuple = ()):
    """H_res · x + H_postᵀ · y: x (..., n, C), h_res (..., n, n), h_post (..., n), y = F's output (..., C)."""
    return (h_res @ x + h_post.unsqueeze(-1) * y.unsqueeze(-2)).to(x.dtype)


@dataclass(frozen=True)
class StreamOps:
    """One implementation of the four stream functions."""

    sinkhorn: Callable
    rms_projection: Callable
    read_streams: Callable
    mix_streams: Callable


READABLE = StreamOps(sinkhorn, rms_projection, read_streams, mix_streams)
FUSED = StreamOps(kernels.sinkhorn, kernels.rms_projection, kernels.read_streams, kernels.mix_streams)


def identity_like_logit(n: int, diagonal: float = 0.95) -> float:
    """Logit s such that Sinkhorn(s·I) has the given diagonal: s·I is already balanced, so its Sinkhorn is the
    row softmax, diagonal e^s / (e^s + n - 1)."""
    return math.log(diagonal * max(n - 1, 1) / (1 - diagonal)) if n > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Creating and collapsing the streams


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., C) -> (..., n, C): every stream starts as a copy of the embedding."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


class Streams(NamedTuple):
    """The residual state between sites under block recompute (``ModelConfig.stream_recompute``): the streams x
    (..., n, C) and ``replay`` = (x at the start of the recompute block, then H_res, H_post, y of each site since),
    from which the fused kernels rebuild x in backward instead of keeping it. Empty replay: x is kept."""

    x: torch.Tensor
    replay: tuple[torch.Tensor, ...] = ()


def _stream_tensor(state: torch.Tensor | Streams) -> torch.Tensor:
    return state.x if isinstance(state, Streams) else state


class StreamCollapse(nn.Module):
    """(..., n, C) -> (..., C) before the final norm: mean, sum, or learned dynamic weights (DeepSeek-V4 style:
    RMSNorm(flat) -> n weights -> sigmoid -> weighted sum; initialised to the mean)."""

    def __init__(self, mode: str, n: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.mode, self.n, self.eps = mode, n, eps
        if mode == "learned":
            self.proj = nn.Linear(n * dim, n)
            nn.init.zeros_(self.proj.weight)
            nn.init.constant_(self.proj.bias, -math.log(n - 1) if n > 1 else 10.0)  # sigmoid(bias) = 1/n

    def forward(self, state: torch.Tensor | Streams) -> torch.Tensor:
        x = _stream_tensor(state)
        if self.mode == "mean":
            return x.mean(dim=-2)
        if self.mode == "sum":
            return x.sum(dim=-2)
        flat = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), eps=self.eps)
        w = torch.sigmoid(self.proj(flat))  # (..., n)
        return torch.einsum("...n,...nc->...c", w, x)

    @staticmethod
    def weights(cfg: ModelConfig) -> int:
        """Matmul weights of the learned collapse (its n biases are not counted as FLOPs), 0 for mean and sum."""
        return cfg.n_streams * cfg.d_model * cfg.n_streams if cfg.stream_collapse == "learned" else 0

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return StreamCollapse.weights(cfg) + (cfg.n_streams if cfg.stream_collapse == "learned" else 0)


# ---------------------------------------------------------------------------------------------------------------------
# The three residual connections


class Residual(nn.Module):
    """A residual connection around a block function ``fn`` (the site's F), with its pre-norm ``norm``.

    A subclass is a residual kind: it says how the model creates and collapses its residual state and what its
    parameters and FLOPs are, so that nothing outside this file dispatches on the kind's name."""

    mixes_streams = False
    """True when the residual state is n streams, (..., n, C), mixed by an H_res per site."""

    def __init__(self, fn: nn.Module, dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.fn = fn

    @classmethod
    def build(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> Residual:
        """The connection around ``fn`` at site ``site_index`` (counted from the bottom, 2 per block)."""
        raise NotImplementedError

    @staticmethod
    def expand(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """The embedding (..., C) -> the residual state the first site reads."""
        return x

    @staticmethod
    def collapse(cfg: ModelConfig) -> nn.Module:
        """The module that turns the residual state back into (..., C) before the final norm."""
        return nn.Identity()

    @classmethod
    def site_params(cls, cfg: ModelConfig) -> int:
        """Parameters of one site besides F's: the pre-norm gain and the connection's coefficients."""
        return cfg.d_model

    @classmethod
    def site_flops(cls, cfg: ModelConfig) -> int:
        """Forward FLOPs per token of one site besides F's (coefficients and stream mixing)."""
        return 0

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        """Parameters of all 2·n_layers sites besides F's, and of the stream collapse."""
        return 2 * cfg.n_layers * cls.site_params(cfg)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig) -> int:
        """Training FLOPs (forward + backward = 3 × forward) per token of all sites besides F's, and of the collapse."""
        return 3 * 2 * cfg.n_layers * cls.site_flops(cfg)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """The connection's own parameters (not F's): norm gains and coefficient tables, never weight-decayed."""
        return [p for name, p in self.named_parameters() if not name.startswith("fn.")]

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor | None:
        """H_res for the residual state x, (..., n, n) — the map the residual path applies — or None for the
        identity."""
        return None


class PlainResidual(Residual):
    """Pre-norm residual: x + F(RMSNorm(x)), x: (..., C)."""

    def __init__(self, fn: nn.Module, dim: int, eps: float = 1e-6):
        super().__init__(fn, dim, eps)

    @classmethod
    def build(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> PlainResidual:
        return cls(fn, cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return x + self.fn(self.norm(x), **kwargs)


class _StreamResidual(Residual):
    """Shared forward of HC and mHC; subclasses provide ``_coefficients(x)`` -> (H_pre, H_post, H_res) with shapes
    (..., n), (..., n), (..., n, n), computed in fp32 (or x's dtype if wider)."""

    mixes_streams = True

    def __init__(self, fn: nn.Module, dim: int, n: int, eps: float):
        super().__init__(fn, dim, eps)
        self.n, self.eps = n, eps
        self.ops = FUSED
        self.replay_next = False  # block recompute: the next site belongs to this site's block

    @classmethod
    def build(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> _StreamResidual:
        site = cls._from_config(cfg, fn, site_index)
        k = cfg.stream_recompute
        site.replay_next = k > 1 and site_index % k != k - 1
        return site

    @classmethod
    def _from_config(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> _StreamResidual:
        raise NotImplementedError

    @staticmethod
    def expand(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor | Streams:
        x = expand_streams(x, cfg.n_streams)  # a view of the embedding (stride 0 over n)
        # under block recompute the first block starts from that view: backward keeps the C-wide embedding
        return Streams(x, (x,)) if cfg.stream_recompute > 1 else x

    @staticmethod
    def collapse(cfg: ModelConfig) -> nn.Module:
        return StreamCollapse(cfg.stream_collapse, cfg.n_streams, cfg.d_model, cfg.norm_eps)

    @classmethod
    def site_flops(cls, cfg: ModelConfig) -> int:
        n, d = cfg.n_streams, cfg.d_model
        return 2 * d * (n + n * n + n)  # read H_pre·x, mix H_res·x, write H_postᵀ·y: one multiply-add each

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        return super().num_params(cfg) + StreamCollapse.num_params(cfg)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig) -> int:
        return super().flops_per_token(cfg) + 3 * 2 * StreamCollapse.weights(cfg)

    def coefficients(self, x: torch.Tensor, replay: tuple = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre, H_post, H_res) for the streams x: (..., n, C), in fp32 even under autocast."""
        with autocast_off(x.device.type):
            return self._coefficients(upcast(x), replay)

    def mixing_matrix(self, x: torch.Tensor | Streams) -> torch.Tensor:
        return self.coefficients(_stream_tensor(x).contiguous())[2].detach()

    def forward(self, state: torch.Tensor | Streams, **kwargs) -> torch.Tensor | Streams:
        # x: (..., n, C), the residual streams (kept in fp32 under autocast). The first site gets the expanded
        # embedding (stride 0 over n): one contiguous copy, shared by everything below, beats the slow strided paths
        # of the projection and the batched matmuls of backward.
        x, replay = (state.x, state.replay) if isinstance(state, Streams) else (state, ())
        x = x.contiguous()
        h_pre, h_post, h_res = self.coefficients(x, replay)
        with autocast_off(x.device.type):
            read = self.ops.read_streams(x, h_pre, upcast(self.norm.weight), self.norm.eps, replay)  # RMSNorm(H_pre·x)
        y = self.fn(read.to(x.dtype), **kwargs)  # F runs once, on a C-vector: (..., C)
        with autocast_off(x.device.type):
            out = self.ops.mix_streams(x, h_res, h_post, y, replay)  # H_res · x + H_postᵀ · y: (..., n, C)
        if not isinstance(state, Streams):
            return out
        return Streams(out, (*(replay or (x,)), h_res, h_post, y) if self.replay_next else ())


class HyperConnection(_StreamResidual):
    """Hyper-Connections (ByteDance, arXiv 2409.19606), static + dynamic.

    Static: read weights A_m (n), mixing A_r (n×n), write weights B (n). Dynamic: each stream x_i is RMS-normalised
    and mapped by W (zero-initialised) to 1 + n + 1 numbers, squashed by tanh and scaled by s_α / s_β (0.01):
        A_m(x)_i = A_m_i + s_α tanh(x̄_i · W_m),  A_r(x)_ij = A_r_ij + s_α tanh(x̄_i · W_r)_j,
        B(x)_i = B_i + s_β tanh(x̄_i · W_β).
    Then H_pre = A_mᵀ, H_res = A_rᵀ, H_post = B. Initialised as a pre-norm residual: layer k reads stream k mod n,
    A_r = I, B = 1.
    """

    def __init__(self, fn: nn.Module, dim: int, n: int, layer_index: int, eps: float = 1e-6, gate_init: float = 0.01):
        super().__init__(fn, dim, n, eps)
        self.static_read = nn.Parameter(F.one_hot(torch.tensor(layer_index % n), n).float())
        self.static_mix = nn.Parameter(torch.eye(n))
        self.static_write = nn.Parameter(torch.ones(n))
        self.dynamic = nn.Linear(dim, n + 2, bias=False)  # columns: W_m | W_r (n) | W_β
        nn.init.zeros_(self.dynamic.weight)
        self.scale_alpha = nn.Parameter(torch.tensor(gate_init))
        self.scale_beta = nn.Parameter(torch.tensor(gate_init))

    @classmethod
    def _from_config(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> HyperConnection:
        return cls(fn, cfg.d_model, cfg.n_streams, site_index, cfg.norm_eps, cfg.mhc_gate_init)

    @classmethod
    def site_params(cls, cfg: ModelConfig) -> int:
        n, d = cfg.n_streams, cfg.d_model
        return d + n + n * n + n + d * (n + 2) + 2  # norm, A_m, A_r, B, W, s_α, s_β

    @classmethod
    def site_flops(cls, cfg: ModelConfig) -> int:
        n, d = cfg.n_streams, cfg.d_model
        return super().site_flops(cfg) + 2 * n * d * (n + 2)  # W applied to each of the n streams

    def _coefficients(self, x: torch.Tensor, replay: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # d: (..., n, n+2), row i = tanh(RMSNorm(x_i) · W) from stream i
        d = torch.tanh(self.ops.rms_projection(x, upcast(self.dynamic.weight).t(), self.eps, replay))
        a_m = self.static_read + self.scale_alpha * d[..., 0]  # (..., n)
        a_r = self.static_mix + self.scale_alpha * d[..., 1 : self.n + 1]  # (..., n, n), [i, j]
        b = self.static_write + self.scale_beta * d[..., -1]  # (..., n)
        return a_m, b, a_r.transpose(-1, -2)


class ManifoldHyperConnection(_StreamResidual):
    """mHC (DeepSeek-AI, arXiv 2512.24880, Eq. 7-9).

        v' = RMSNorm(vec(x)),  [h_pre | h_post | h_res] = v' · φ      (φ: nC -> 2n + n²)
        H_pre = σ(α_pre h_pre + b_pre),  H_post = 2σ(α_post h_post + b_post),
        H_res = SinkhornKnopp(α_res mat(h_res) + b_res)

    RMSNorm is scale-only (its weight would fold into φ). Defaults: b_pre = logit(1/n) (read the mean of the
    streams), b_post = 0 (write 1 to every stream), b_res per ``res_init``.
    """

    def __init__(
        self,
        fn: nn.Module,
        dim: int,
        n: int,
        eps: float = 1e-6,
        sinkhorn_iters: int = 20,
        res_init: str = "identity",
        gate_init: float = 0.01,
        init_std: float = 0.02,
    ):
        super().__init__(fn, dim, n, eps)
        self.sinkhorn_iters = sinkhorn_iters
        self.phi = nn.Parameter(torch.randn(n * dim, 2 * n + n * n) * init_std)
        self.alpha = nn.Parameter(torch.full((3,), float(gate_init)))  # α_pre, α_post, α_res
        self.b_pre = nn.Parameter(torch.full((n,), -math.log(n - 1) if n > 1 else 10.0))  # σ(b_pre) = 1/n
        self.b_post = nn.Parameter(torch.zeros(n))  # 2σ(0) = 1
        scale = {"identity": identity_like_logit(n), "uniform": 0.0, "eye": 1.0}[res_init]
        self.b_res = nn.Parameter(torch.eye(n) * scale)

    @classmethod
    def _from_config(cls, cfg: ModelConfig, fn: nn.Module, site_index: int) -> ManifoldHyperConnection:
        return cls(
            fn,
            cfg.d_model,
            cfg.n_streams,
            cfg.norm_eps,
            cfg.sinkhorn_iters,
            cfg.mhc_res_init,
            cfg.mhc_gate_init,
            cfg.init_std,
        )

    @classmethod
    def site_params(cls, cfg: ModelConfig) -> int:
        n, d = cfg.n_streams, cfg.d_model
        return d + n * d * (2 * n + n * n) + 3 + 2 * n + n * n  # norm, φ, α, b_pre, b_post, b_res

    @classmethod
    def site_flops(cls, cfg: ModelConfig) -> int:
        n, d = cfg.n_streams, cfg.d_model
        return super().site_flops(cfg) + 2 * n * d * (2 * n + n * n)  # v · φ

    def _coefficients(self, x: torch.Tensor, replay: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        h = self.ops.rms_projection(x.flatten(-2), upcast(self.phi), self.eps, replay)  # RMSNorm(vec x)·φ: (.., 2n+n²)
        h_pre = torch.sigmoid(self.alpha[0] * h[..., :n] + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha[1] * h[..., n : 2 * n] + self.b_post)
        res_logits = self.alpha[2] * h[..., 2 * n :].unflatten(-1, (n, n)) + self.b_res
        return h_pre, h_post, self.ops.sinkhorn(res_logits, self.sinkhorn_iters)


RESIDUALS: dict[str, type[Residual]] = {"plain": PlainResidual, "hc": HyperConnection, "mhc": ManifoldHyperConnection}
"""The residual kinds by the name ``ModelConfig.residual`` gives them."""


def make_residual(cfg: ModelConfig, fn: nn.Module, site_index: int) -> Residual:
    """The residual connection ``cfg.residual`` around ``fn``; ``site_index`` counts sites from the bottom."""
    return RESIDUALS[cfg.residual].build(cfg, fn, site_index)
