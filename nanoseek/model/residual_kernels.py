"""Fused kernels of the stream residuals (residual.py): the same maths as its readable functions, tested equal to
them in float64 (tests/test_residual_kernels.py), written to touch the n·C-wide stream as little as eager PyTorch
allows and to let torch.compile fuse the rest.

    sinkhorn(logits, t)              Sinkhorn-Knopp with the tokens last, in place; backward from the denominators
                                     (on CPU the same steps run in C: native.py)
    rms_projection(v, phi, eps)      RMSNorm(v) · φ without the normalised copy of v
    read_streams(x, h_pre, w, eps)   RMSNorm(H_pre · x) · w, H_pre · x recomputed in backward
    mix_streams(x, h_res, h_post, y) H_res · x + H_postᵀ · y

F's cost does not change with n; what grows is traffic over the stream x: (..., n, C). The three stream functions
each save x itself (one storage, shared by all three) and a few numbers per token, and allocate one n·C-wide buffer
forward or backward at most. A sum over the n streams is a batched matmul eagerly (one pass) and a loop of fused
multiply-adds under torch.compile, which fuses the loop and what surrounds it into single passes; both forms are
tested equal to the readable equations.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext

import torch

from nanoseek.model import native


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged (coefficients are never computed in half)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def autocast_off(device_type: str) -> AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` while autocast is on, else nothing. A compiled graph with an
    autocast switch inside is never stored in torch 2.13's compile cache (its AOTAutograd stage bypasses the cache
    for ``_enter_autocast``, fixed in later torch), so every process traced a float32 mHC or MoE model's training
    step again: 7.7 s instead of 3 s for a 2-layer mHC model (docs/LOG.md). A model without autocast needs no switch;
    under bf16 autocast the bypass remains."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


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
    if native.usable(logits):  # the same steps in C, a block of tokens at a time (nanoseek/model/native.py)
        return native.sinkhorn_forward(logits, n_iters)
    m, _ = _sinkhorn_in_place(_tokens_last(logits), n_iters)
    return m.permute(2, 0, 1).reshape(logits.shape).contiguous()


@torch.library.custom_op("nanoseek::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Backward reruns the forward keeping only the denominators, then walks the steps in reverse: step k was
    y = m / d_k (d_k = Σ_dim m + tiny), so dL/dm = (g - Σ_dim g·y) / d_k, and the step's input is recovered in
    place as m = y · d_k. The gradient equals unrolled autograd up to the rounding of those 2·t_max
    multiplications (≈ 1e-14 relative in float64), without storing any iterate."""
    if native.usable(logits):
        return native.sinkhorn_backward(grad, logits, n_iters)
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


# ---------------------------------------------------------------------------------------------------------------------
# Reading, mixing and writing the streams
#
# Block recompute (the mHC paper's): inside a block of sites only the block's first stream state is kept for
# backward. Each function below takes an optional ``replay`` = (x_start, H_res, H_post, y of every earlier site of
# the block): when given, it saves those instead of x, and backward rebuilds x by replaying the mixes. The F outputs
# y (C per token) and the coefficients are saved anyway; what is not kept is the n·C-wide x of every site.
# Each function replays on its own (stateless, so torch.compile can trace it and merge the repeated replays).


def _dot_over_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_c a_ic b_jc: a (..., p, C), b (..., q, C) -> (..., p, q), p and q tiny. torch.compile turns the broadcast
    product summed over C into one fused loop; eager would materialise p·q·C numbers per token, so it gets a
    batched matmul instead."""
    if torch.compiler.is_compiling():
        return (a.unsqueeze(-2) * b.unsqueeze(-3)).sum(dim=-1)
    return a @ b.transpose(-1, -2)


def _sum_over_streams(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j x_j over the streams of x (..., n, C): w (..., n) -> (..., C), or w (..., p, n) -> (..., p, C), in
    the two's promoted dtype. Under torch.compile a loop of n fused multiply-adds, which inductor fuses with what
    surrounds it into one pass; eager a batched matmul, one pass where the loop takes n (2.0 against 0.8 ms for
    H_resᵀ · g at B·T = 2048, n = 4, C = 256 on 2 cores; docs/LOG.md)."""
    vector = w.dim() == x.dim() - 1
    if torch.compiler.is_compiling():

        def term(j: int) -> tuple[torch.Tensor, torch.Tensor]:  # weight(s) of stream j, and stream j
            return (w[..., j : j + 1], x[..., j, :]) if vector else (w[..., :, j : j + 1], x[..., j : j + 1, :])

        out = torch.mul(*term(0))
        for j in range(1, x.shape[-2]):
            out.addcmul_(*term(j))
        return out
    dtype = torch.promote_types(w.dtype, x.dtype)
    if vector:
        return (w.unsqueeze(-2).to(dtype) @ x.to(dtype)).squeeze(-2)
    return w.to(dtype) @ x.to(dtype)


def _mix(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H_res · x + H_postᵀ · y, computed in the coefficients' precision, returned in x's dtype. Compiled, the loop
    starts from H_postᵀ · y, the form whose saved activations the benchmarks measured."""
    if not torch.compiler.is_compiling():
        return _sum_over_streams(h_res, x).addcmul_(h_post.unsqueeze(-1), y.unsqueeze(-2)).to(x.dtype)
    out = h_post.unsqueeze(-1) * y.unsqueeze(-2)  # H_postᵀ · y
    for j in range(x.shape[-2]):
        out.addcmul_(h_res[..., j : j + 1], x[..., j : j + 1, :])  # + column j of H_res ⊗ stream j
    return out.to(x.dtype)


def replay_streams(start: torch.Tensor, *history: torch.Tensor) -> torch.Tensor:
    """The stream state after the sites whose (H_res, H_post, y) are ``history``, starting from ``start``.

    Under torch.compile the replay is written as a broadcast product summed over j: the same numbers (to rounding)
    from different operations, so that common-subexpression elimination does not merge it with the forward's mix
    (which would make backward read the forward's x after all, and the partitioner keep it). Eager reuses the
    states of the last replay (see _ReplayMemo)."""
    if torch.compiler.is_compiling():
        x = start.contiguous()
        for k in range(0, len(history), 3):
            h_res, h_post, y = history[k : k + 3]
            x = ((h_res.unsqueeze(-1) * x.unsqueeze(-3)).sum(dim=-2) + h_post.unsqueeze(-1) * y.unsqueeze(-2)).to(
                x.dtype
            )
        return x
    return _memo.replay(start, history)


class _ReplayMemo:
    """The states of the last eager replay, so that a block's k sites replay k - 1 mixes in all instead of one
    chain per function (three per site). Backward walks the block downwards: site l's functions ask for the state
    after l - l0 mixes, then site l - 1's for a prefix of the same chain; the states past the one asked for are no
    longer needed and are dropped. Inputs are matched by identity (weak references, so nothing is kept alive). The
    model's first block starts from the expanded embedding with no site before it: its replays (the last of a
    backward) empty the memo."""

    def __init__(self):
        self.inputs: list[weakref.ref] = []
        self.states: list[torch.Tensor] = []  # states[i]: after the first i sites of the chain (states[0] = start)

    def replay(self, start: torch.Tensor, history: tuple) -> torch.Tensor:
        if not history:
            self.inputs, self.states = [], []
            return start.contiguous()
        inputs = (start, *history)
        same = 0  # how many leading inputs match the cached chain's
        while same < min(len(inputs), len(self.inputs)) and self.inputs[same]() is inputs[same]:
            same += 1
        if same == 0:
            self.inputs, self.states = [], []
        kept = 0 if same == 0 else 1 + (same - 1) // 3  # cached states computed from matching inputs only
        sites = len(history) // 3
        self.inputs = [weakref.ref(t) for t in inputs]
        self.states = self.states[: min(kept, sites + 1)] or [start.contiguous()]
        for i in range(len(self.states) - 1, sites):
            self.states.append(_mix(self.states[i], *history[3 * i : 3 * i + 3]))
        return self.states[sites]


_memo = _ReplayMemo()


def _save(ctx, tensors: tuple, x: torch.Tensor, replay: tuple) -> None:
    """Save ``tensors`` and the stream x, or, with a replay, what rebuilds x instead of x."""
    ctx.x_shape, ctx.x_dtype, ctx.n_replay, ctx.n_saved = x.shape, x.dtype, len(replay), len(tensors)
    ctx.save_for_backward(*tensors, *(replay or (x,)))


def _saved(ctx) -> tuple[tuple, torch.Tensor]:
    """The tensors saved by ``_save`` and the stream x (rebuilt if it was not kept)."""
    saved = ctx.saved_tensors
    tensors, rest = saved[: ctx.n_saved], saved[ctx.n_saved :]
    x = replay_streams(*rest).reshape(ctx.x_shape).to(ctx.x_dtype) if ctx.n_replay else rest[0]
    return tensors, x


class _ReadStreams(torch.autograd.Function):
    """The block's input RMSNorm(H_pre · x) · w, H_pre · x = Σ_j H_pre_j x_j.
    x: (..., n, C), h_pre: (..., n), weight: (C,) -> (..., C) in the promoted dtype of x and h_pre.
    Saves x, h_pre and one number per token: H_pre · x is recomputed in backward instead of kept (C per token)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h_pre: torch.Tensor, weight: torch.Tensor, eps: float, *replay) -> torch.Tensor:
        read = _sum_over_streams(h_pre, x)  # H_pre · x
        rstd = torch.rsqrt(read.square().mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        _save(ctx, (h_pre, weight, rstd), x, replay)
        return read.mul_(rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h_pre, weight, rstd), x = _saved(ctx)
        read = (h_pre.unsqueeze(-2) @ upcast(x)).squeeze(-2)  # (..., C), recomputed
        # out = read · rstd · w: dL/dw = Σ g · read · rstd, dL/dread = rstd · (g·w - read · rstd² · mean(g·w·read))
        normed = read * rstd
        grad_w = (g * normed).flatten(0, -2).sum(0)
        gw = g * weight
        grad_read = (gw - normed * (gw * normed).mean(dim=-1, keepdim=True)).mul_(rstd)
        grad_x = h_pre.unsqueeze(-1) * grad_read.unsqueeze(-2)  # (..., n, C)
        grad_h_pre = _dot_over_channels(grad_read.unsqueeze(-2), upcast(x)).squeeze(-2)  # Σ_c g_c x_jc: (..., n)
        return grad_x.to(x.dtype), grad_h_pre, grad_w.to(weight.dtype), None, *[None] * ctx.n_replay


class _MixStreams(torch.autograd.Function):
    """out = H_res · x + H_postᵀ · y, i.e. out_i = Σ_j H_res_ij x_j + H_post_i y  (DESIGN.md §3).
    x: (..., n, C), h_res: (..., n, n), h_post: (..., n), y: (..., C) -> (..., n, C) in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor, *replay):
        _save(ctx, (h_res, h_post, y), x, replay)
        return _mix(x, h_res, h_post, y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h_res, h_post, y), x = _saved(ctx)
        g = upcast(g)
        grad_x = _sum_over_streams(h_res.transpose(-1, -2), g)  # H_resᵀ · g
        grad_y = _sum_over_streams(h_post, g)  # H_post · g
        grad_h_res = _dot_over_channels(g, upcast(x))  # Σ_c g_ic x_jc: (..., n, n)
        grad_h_post = _dot_over_channels(g, upcast(y).unsqueeze(-2)).squeeze(-1)  # Σ_c g_ic y_c: (..., n)
        return grad_x.to(x.dtype), grad_h_res, grad_h_post, grad_y.to(y.dtype), *[None] * ctx.n_replay


class _RMSProjection(torch.autograd.Function):
    """RMSNorm(v) · φ = (v · φ) · r with r = rsqrt(mean(v²) + eps) per token, never materialising the normalised
    copy of v.   v: (..., D), phi: (D, k) -> (..., k). Saves v and k + 1 numbers per token. With a replay, v is
    the stream state reshaped (mHC: flattened; HC: per stream, unchanged)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, phi: torch.Tensor, eps: float, *replay) -> torch.Tensor:
        proj = v @ phi
        r = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        _save(ctx, (phi, proj, r), v, replay)
        return proj * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (phi, proj, r), v = _saved(ctx)
        g_proj = g * r  # dL/d(v·φ)
        # dL/dr = Σ_k g_k proj_k and dr/dv = -r³ v / D
        g_v_coef = (g * proj).sum(dim=-1, keepdim=True) * r.pow(3) / -v.shape[-1]  # (..., 1)
        grad_v = (g_proj @ phi.t()).addcmul_(v, g_v_coef)
        grad_phi = (g_proj.flatten(0, -2).t() @ v.flatten(0, -2)).t()  # (k, D) @ ... is the faster orientation
        return grad_v, grad_phi, None, *[None] * ctx.n_replay


def read_streams(x: torch.Tensor, h_pre: torch.Tensor, weight: torch.Tensor, eps: float, replay: tuple = ()):
    """The block input RMSNorm(H_pre · x) with gain ``weight``: x (..., n, C), h_pre (..., n) -> (..., C)."""
    return _ReadStreams.apply(x, h_pre, weight, eps, *replay)


def mix_streams(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor, replay: tuple = ()):
    """H_res · x + H_postᵀ · y: x (..., n, C), h_res (..., n, n), h_post (..., n), y (..., C) -> (..., n, C)."""
    return _MixStreams.apply(x, h_res, h_post, y, *replay)


def rms_projection(v: torch.Tensor, phi: torch.Tensor, eps: float, replay: tuple = ()) -> torch.Tensor:
    """RMSNorm(v) · φ (scale-free RMSNorm): v (..., D), phi (D, k) -> (..., k)."""
    return _RMSProjection.apply(v, phi, eps, *replay)
