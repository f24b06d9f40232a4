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

from nanoseek.model.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def sinkhorn_unrolled(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Reference Sinkhorn-Knopp on (..., n, n), straight from the definition, through plain autograd (which stores
    every iterate for backward)."""
    tiny = torch.finfo(logits.dtype).tiny
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(n_iters):
        for dim in (-2, -1):  # columns, then rows (done last, so exact)
            m = m / (m.sum(dim=dim, keepdim=True) + tiny)
    return m


def _tokens_last(m: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> a new contiguous (n, n, N). The matrices are tiny and the tokens many: with the tokens last,
    a row or column sum adds n contiguous vectors of N numbers, several times faster than n-wide reductions."""
    n = m.shape[-1]
    return m.reshape(-1, n, n).permute(1, 2, 0).clone(memory_format=torch.contiguous_format)


def _sinkhorn_in_place(m: torch.Tensor, n_iters: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sinkhorn-Knopp on tokens-last logits m: (n, n, N), normalising one buffer in place (fresh buffers per
    iterate cost more than the arithmetic at this size). Returns the result and the 2·n_iters denominators
    (column sums, row sums, column sums, ...), each (1, n, N) or (n, 1, N): step k divided by dens[k]."""
    tiny = torch.finfo(m.dtype).tiny  # keeps a column of underflowed zeros (huge logits) at zero instead of 0/0
    m = (m - m.amax(dim=(0, 1), keepdim=True)).exp_()
    dens = []
    for _ in range(n_iters):
        for dim in (0, 1):  # columns sum to 1 (sum over the row index i), then rows (done last, so exact)
            dens.append(m.sum(dim=dim, keepdim=True).add_(tiny))
            m.div_(dens[-1])
    return m, dens


# Sinkhorn is an opaque operator (torch.library.custom_op) rather than an autograd.Function: traced by torch.compile,
# its 2·t_max dependent reductions compile slowly (tens of seconds per site) into code slower than this eager loop.


@torch.library.custom_op("nanoseek::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    m, _ = _sinkhorn_in_place(_tokens_last(logits), n_iters)
    return m.permute(2, 0, 1).reshape(logits.shape).contiguous()


@torch.library.custom_op("nanoseek::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Backward reruns the forward keeping only the denominators, then walks the steps in reverse: step k was
    y = m / d_k (d_k = Σ_dim m + tiny), so dL/dm = (g - Σ_dim g·y) / d_k, and the step's input is recovered in
    place as m = y · d_k. The gradient equals unrolled autograd up to the rounding of those 2·t_max
    multiplications (≈ 1e-14 relative in float64), without storing any iterate."""
    m, dens = _sinkhorn_in_place(_tokens_last(logits), n_iters)
    grad = _tokens_last(grad)
    gy = torch.empty_like(m)
    for k in range(len(dens) - 1, -1, -1):
        dim = k % 2  # 0: column step, 1: row step
        torch.mul(grad, m, out=gy)
        grad.sub_(gy.sum(dim=dim, keepdim=True)).div_(dens[k])
        m.mul_(dens[k])
    # m is now M_0 = exp(L - max): the max shift cancels in the first normalisation, so it carries no gradient.
    return (grad * m).permute(2, 0, 1).reshape(logits.shape).contiguous()


@_sinkhorn_op.register_fake
def _(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    return logits.new_empty(logits.shape)


@_sinkhorn_backward_op.register_fake
def _(grad: torch.Tensor, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    return logits.new_empty(logits.shape)


def _sinkhorn_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    logits, ctx.n_iters = inputs
    ctx.save_for_backward(logits)  # the forward keeps only its input


def _sinkhorn_grad(ctx, grad: torch.Tensor):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward_op(grad, logits, ctx.n_iters), None


_sinkhorn_op.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


def sinkhorn(logits: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """Project logits (..., n, n) onto (approximately) doubly stochastic matrices by Sinkhorn-Knopp.

    exp(logits), then ``n_iters`` rounds of column then row normalisation. Rows sum to 1 exactly; columns
    approximately. Memory-light backward (see ``_sinkhorn_backward_op``)."""
    if n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} is invalid: expected an integer >= 1")
    return _sinkhorn_op(logits, n_iters)


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
# Reading, mixing and writing the streams
#
# F's cost does not change with n; what grows is traffic over the n·C-wide stream x. The three functions below touch
# it as little as eager PyTorch allows: each saves x itself (one storage, shared by all three) and a few numbers per
# token, allocates one n·C-wide buffer forward or backward at most, and loops over the n streams with fused
# multiply-adds, which torch.compile fuses further into single passes.


def _dot_over_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_c a_ic b_jc: a (..., p, C), b (..., q, C) -> (..., p, q), p and q tiny. torch.compile turns the broadcast
    product summed over C into one fused loop; eager would materialise p·q·C numbers per token, so it gets a
    batched matmul instead."""
    if torch.compiler.is_compiling():
        return (a.unsqueeze(-2) * b.unsqueeze(-3)).sum(dim=-1)
    return a @ b.transpose(-1, -2)


class _ReadStreams(torch.autograd.Function):
    """The block's input RMSNorm(H_pre · x) · w, H_pre · x = Σ_j H_pre_j x_j.
    x: (..., n, C), h_pre: (..., n), weight: (C,) -> (..., C) in the promoted dtype of x and h_pre.
    Saves x, h_pre and one number per token: H_pre · x is recomputed in backward instead of kept (C per token)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h_pre: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        read = h_pre[..., 0:1] * x[..., 0, :]
        for j in range(1, x.shape[-2]):
            read.addcmul_(h_pre[..., j : j + 1], x[..., j, :])
        rstd = torch.rsqrt(read.square().mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, h_pre, weight, rstd)
        return read.mul_(rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, h_pre, weight, rstd = ctx.saved_tensors
        read = (h_pre.unsqueeze(-2) @ upcast(x)).squeeze(-2)  # (..., C), recomputed
        # out = read · rstd · w: dL/dw = Σ g · read · rstd, dL/dread = rstd · (g·w - read · rstd² · mean(g·w·read))
        normed = read * rstd
        grad_w = (g * normed).flatten(0, -2).sum(0)
        gw = g * weight
        grad_read = (gw - normed * (gw * normed).mean(dim=-1, keepdim=True)).mul_(rstd)
        grad_x = h_pre.unsqueeze(-1) * grad_read.unsqueeze(-2)  # (..., n, C)
        grad_h_pre = _dot_over_channels(grad_read.unsqueeze(-2), upcast(x)).squeeze(-2)  # Σ_c g_c x_jc: (..., n)
        return grad_x.to(x.dtype), grad_h_pre, grad_w.to(weight.dtype), None


class _MixStreams(torch.autograd.Function):
    """out = H_res · x + H_postᵀ · y, i.e. out_i = Σ_j H_res_ij x_j + H_post_i y  (DESIGN.md §3).
    x: (..., n, C), h_res: (..., n, n), h_post: (..., n), y: (..., C) -> (..., n, C) in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, h_res, h_post, y)
        out = h_post.unsqueeze(-1) * y.unsqueeze(-2)  # H_postᵀ · y, in the coefficients' precision
        for j in range(x.shape[-2]):
            out.addcmul_(h_res[..., j : j + 1], x[..., j : j + 1, :])  # + column j of H_res ⊗ stream j
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, h_res, h_post, y = ctx.saved_tensors
        g = upcast(g)
        grad_x = h_res[..., 0, :].unsqueeze(-1) * g[..., 0:1, :]  # H_resᵀ · g, one row of H_res at a time
        grad_y = h_post[..., 0:1] * g[..., 0, :]  # H_post · g
        for i in range(1, x.shape[-2]):
            grad_x.addcmul_(h_res[..., i, :].unsqueeze(-1), g[..., i : i + 1, :])
            grad_y.addcmul_(h_post[..., i : i + 1], g[..., i, :])
        grad_h_res = _dot_over_channels(g, upcast(x))  # Σ_c g_ic x_jc: (..., n, n)
        grad_h_post = _dot_over_channels(g, upcast(y).unsqueeze(-2)).squeeze(-1)  # Σ_c g_ic y_c: (..., n)
        return grad_x.to(x.dtype), grad_h_res, grad_h_post, grad_y.to(y.dtype)


class _RMSProjection(torch.autograd.Function):
    """RMSNorm(v) · φ = (v · φ) · r with r = rsqrt(mean(v²) + eps) per token, never materialising the normalised
    copy of v.   v: (..., D), phi: (D, k) -> (..., k). Saves v and k + 1 numbers per token."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
        proj = v @ phi
        r = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        ctx.save_for_backward(v, phi, proj, r)
        return proj * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, phi, proj, r = ctx.saved_tensors
        g_proj = g * r  # dL/d(v·φ)
        # dL/dr = Σ_k g_k proj_k and dr/dv = -r³ v / D
        g_v_coef = (g * proj).sum(dim=-1, keepdim=True) * r.pow(3) / -v.shape[-1]  # (..., 1)
        grad_v = (g_proj @ phi.t()).addcmul_(v, g_v_coef)
        grad_phi = (g_proj.flatten(0, -2).t() @ v.flatten(0, -2)).t()  # (k, D) @ ... is the faster orientation
        return grad_v, grad_phi, None


def read_streams(x: torch.Tensor, h_pre: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The block input RMSNorm(H_pre · x) with gain ``weight``: x (..., n, C), h_pre (..., n) -> (..., C). Equals
    ``F.rms_norm(torch.einsum("...n,...nc->...c", h_pre, x), (C,), weight, eps)``."""
    return _ReadStreams.apply(x, h_pre, weight, eps)


def mix_streams(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H_res · x + H_postᵀ · y: x (..., n, C), h_res (..., n, n), h_post (..., n), y (..., C) -> (..., n, C)."""
    return _MixStreams.apply(x, h_res, h_post, y)


def rms_projection(v: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(v) · φ (scale-free RMSNorm): v (..., D), phi (D, k) -> (..., k)."""
    return _RMSProjection.apply(v, phi, eps)


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
        # x: (..., n, C), the residual streams (kept in fp32 under autocast). The first site gets the expanded
        # embedding (stride 0 over n): one contiguous copy, shared by everything below, beats the slow strided paths
        # of the projection and the batched matmuls of backward.
        x = x.contiguous()
        with torch.autocast(device_type=x.device.type, enabled=False):
            h_pre, h_post, h_res = self.coefficients(x)
            if self.record:
                self.recorded = (h_pre.detach(), h_post.detach(), h_res.detach())
            read = read_streams(x, h_pre, upcast(self.norm.weight), self.norm.eps)  # RMSNorm(H_pre · x): (..., C)
        y = self.fn(read.to(x.dtype), **kwargs)  # F runs once, on a C-vector
        with torch.autocast(device_type=x.device.type, enabled=False):
            return mix_streams(x, h_res, h_post, y)  # H_res · x + H_postᵀ · y: (..., n, C)


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
        # RMSNorm(x_i) · W for every stream i, without a normalised copy of the streams
        d = torch.tanh(rms_projection(upcast(x), upcast(self.dynamic.weight).t(), self.eps))
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
        h = rms_projection(upcast(x).flatten(-2), upcast(self.phi), self.eps)  # (..., 2n + n²)
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
