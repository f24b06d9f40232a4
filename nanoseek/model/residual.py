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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def _normalise(m: torch.Tensor, dim: int) -> torch.Tensor:
    """m / m.sum(dim); the tiniest positive float in the denominator keeps a column of underflowed zeros (huge
    logits) at zero instead of 0/0."""
    return m / (m.sum(dim=dim, keepdim=True) + torch.finfo(m.dtype).tiny)


def _sinkhorn_iterates(logits: torch.Tensor, n_iters: int) -> list[torch.Tensor]:
    """All intermediate matrices of Sinkhorn-Knopp: [M_0 = exp(L - max L), after col-norm 1, after row-norm 1, ...]."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    out = [m]
    for _ in range(n_iters):
        out.append(_normalise(out[-1], -2))  # columns sum to 1
        out.append(_normalise(out[-1], -1))  # rows sum to 1 (done last, so exact)
    return out


def sinkhorn_unrolled(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Reference Sinkhorn-Knopp through plain autograd: stores every iterate for backward."""
    return _sinkhorn_iterates(logits, n_iters)[-1]


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp whose forward keeps only its input: backward recomputes the 2·t_max iterates (transiently)
    and runs the exact reverse pass of each normalisation, so the gradient equals unrolled autograd."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
        ctx.n_iters = n_iters
        ctx.save_for_backward(logits)
        m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
        for _ in range(n_iters):
            m = _normalise(_normalise(m, -2), -1)
        return m

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        its = _sinkhorn_iterates(logits, ctx.n_iters)
        tiny = torch.finfo(logits.dtype).tiny
        # Walk back through y = m / (Σ_dim m + tiny): dL/dm = (g - Σ_dim g·y) / (Σ_dim m + tiny). its[k] came from
        # a row normalisation for even k, a column normalisation for odd k.
        for k in range(len(its) - 1, 0, -1):
            dim = -1 if k % 2 == 0 else -2
            y, m = its[k], its[k - 1]
            grad = (grad - (grad * y).sum(dim=dim, keepdim=True)) / (m.sum(dim=dim, keepdim=True) + tiny)
        # M_0 = exp(L - max): the max shift cancels in the first normalisation, so it carries no gradient.
        return grad * its[0], None


def sinkhorn(logits: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """Project logits (..., n, n) onto (approximately) doubly stochastic matrices by Sinkhorn-Knopp.

    exp(logits), then ``n_iters`` rounds of column then row normalisation. Rows sum to 1 exactly; columns
    approximately. Memory-light backward (see ``_Sinkhorn``)."""
    if n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} is invalid: expected an integer >= 1")
    return _Sinkhorn.apply(logits, n_iters)


def identity_like_logit(n: int, diagonal: float = 0.95) -> float:
    """Logit s such that Sinkhorn(s·I) has the given diagonal: s·I is already balanced, so its Sinkhorn is the
    row softmax, diagonal e^s / (e^s + n - 1)."""
    return math.log(diagonal * max(n - 1, 1) / (1 - diagonal)) if n > 1 else 0.0


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged (coefficients are never computed in half)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ---------------------------------------------------------------------------------------------------------------------
# Streams


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., C) -> (..., n, C): every stream starts as a copy of the embedding."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return x.mean(dim=-2)
        if self.mode == "sum":
            return x.sum(dim=-2)
        flat = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), eps=self.eps)
        w = torch.sigmoid(self.proj(flat))  # (..., n)
        return torch.einsum("...n,...nc->...c", w, x)


# ---------------------------------------------------------------------------------------------------------------------
# The three residual connections


class PlainResidual(nn.Module):
    """Pre-norm residual: x + F(RMSNorm(x)), x: (..., C)."""

    def __init__(self, fn: nn.Module, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return x + self.fn(self.norm(x), **kwargs)


class _StreamResidual(nn.Module):
    """Shared forward of HC and mHC; subclasses provide ``coefficients(x)`` -> (H_pre, H_post, H_res) in fp32 with
    shapes (..., n), (..., n), (..., n, n). ``record`` keeps the last coefficients for diagnostics."""

    def __init__(self, fn: nn.Module, dim: int, n: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.fn = fn
        self.n, self.eps = n, eps
        self.record = False
        self.recorded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # x: (..., n, C), the residual streams (kept in fp32 under autocast)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h_pre, h_post, h_res = self.coefficients(x)
            if self.record:
                self.recorded = (h_pre.detach(), h_post.detach(), h_res.detach())
            xf = upcast(x)
            read = torch.einsum("...n,...nc->...c", h_pre, xf)  # H_pre · x: (..., C)
        y = self.fn(self.norm(read.to(x.dtype)), **kwargs)  # F runs once, on a C-vector
        with torch.autocast(device_type=x.device.type, enabled=False):
            mixed = torch.matmul(h_res, xf)  # H_res · x: (..., n, C)
            return (mixed + h_post.unsqueeze(-1) * upcast(y).unsqueeze(-2)).to(x.dtype)


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

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xf = upcast(x)
        d = torch.tanh(F.linear(F.rms_norm(xf, (xf.shape[-1],), eps=self.eps), upcast(self.dynamic.weight)))
        # d: (..., n, n+2), row i from stream i
        a_m = self.static_read + self.scale_alpha * d[..., 0]  # (..., n)
        a_r = self.static_mix + self.scale_alpha * d[..., 1 : self.n + 1]  # (..., n, n), [i, j]
        b = self.static_write + self.scale_beta * d[..., -1]  # (..., n)
        return a_m, b, a_r.transpose(-1, -2)


class ManifoldHyperConnection(_StreamResidual):
    """mHC (DeepSeek-AI, arXiv 2512.24880, Eq. 7-9).

        v' = RMSNorm(vec(x)),  [h_pre | h_post | h_res] = v' · φ      (φ: nC -> 2n + n²)
        H_pre = σ(α_pre h_pre + b_pre),  H_post = 2σ(α_post h_post + b_post),
        H_res = SinkhornKnopp(α_res mat(h_res) + b_res)

    RMSNorm is scale-only (its weight would fold into φ), so v'·φ = (v·φ) · rsqrt(mean v² + eps): the normalised
    copy of the n·C-wide vector is never materialised. Defaults: b_pre = logit(1/n) (read the mean of the
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

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        v = upcast(x).flatten(-2)  # (..., nC)
        inv_rms = torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        h = (v @ upcast(self.phi)) * inv_rms  # (..., 2n + n²)
        h_pre = torch.sigmoid(self.alpha[0] * h[..., :n] + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha[1] * h[..., n : 2 * n] + self.b_post)
        res_logits = self.alpha[2] * h[..., 2 * n :].unflatten(-1, (n, n)) + self.b_res
        return h_pre, h_post, sinkhorn(res_logits, self.sinkhorn_iters)


def make_residual(cfg: ModelConfig, fn: nn.Module, site_index: int) -> nn.Module:
    """The residual connection ``cfg.residual`` around ``fn``; ``site_index`` counts sites from the bottom."""
    if cfg.residual == "plain":
        return PlainResidual(fn, cfg.d_model, cfg.norm_eps)
    if cfg.residual == "hc":
        return HyperConnection(fn, cfg.d_model, cfg.n_streams, site_index, cfg.norm_eps, cfg.mhc_gate_init)
    return ManifoldHyperConnection(
        fn,
        cfg.d_model,
        cfg.n_streams,
        cfg.norm_eps,
        cfg.sinkhorn_iters,
        cfg.mhc_res_init,
        cfg.mhc_gate_init,
        cfg.init_std,
    )
