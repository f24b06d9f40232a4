"""Causal self-attention: rotary position embeddings, grouped-query heads, optional QK-norm, SDPA, and a KV cache
for incremental decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from nanoseek.model.config import ModelConfig


def rotary_tables(head_dim: int, start: int, length: int, base: float, device: torch.device) -> torch.Tensor:
    """cos and sin for positions start .. start+length-1, stacked: (2, length, head_dim / 2), float32."""
    return rotary_at(head_dim, torch.arange(start, start + length, device=device), base)


def rotary_at(head_dim: int, positions: torch.Tensor, base: float) -> torch.Tensor:
    """cos and sin for the positions (P,) given as a tensor (so a compiled step does not specialise on them):
    (2, P, head_dim / 2), float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq
    return torch.stack((angles.cos(), angles.sin()))


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) by position-dependent angles. x: (B, H, T, D); rope: (2, T, D/2)."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    k, v: (L, B, H_kv, T_max, D). ``valid`` (B, T_max) marks real tokens, so left-padded batches of prompts of
    different lengths decode together: padding is never attended to. ``pos`` is the number of positions filled.
    ``offset`` is the rotary position of slot 0: rotary embeddings are relative, so any offset gives the same
    attention; a server that shifts or trims the slots of a running batch keeps each key's position by moving it."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.max_len = max_len
        self.pos = 0
        self.offset = 0

    def mask(self, t_new: int, pad_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record the new tokens' padding and return the attention mask (B, 1, T_new, pos + T_new), or None when
        plain causal attention over the filled cache is exact."""
        end = self.pos + t_new
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, max_len={self.max_len}")
        if pad_mask is not None:
            self.valid[:, self.pos : end] = pad_mask
        if t_new == 1 and bool(self.valid[:, :end].all()):
            return None
        return attention_mask(self.valid[:, :end], self.pos)


class DecodeSlots:
    """A KV cache as one compiled decode step (``Transformer.decode_step``) sees it: read-only k, v
    (L, B, H_kv, T_max, D) and ``mask`` (B, 1, 1, T_max), True for the filled, real slots. The new token attends to
    those and to itself; its key and value are collected in ``new_k``, ``new_v`` (one (B, H_kv, 1, D) per layer) for
    the caller to write into the cache. No Python number changes from step to step, and the graph never writes to
    its inputs, so torch.compile compiles the step once (the cache's length and batch size as dynamic dimensions)
    and copies nothing."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        self.k, self.v, self.mask = k, v, mask
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []


class NewKeys:
    """What a compiled prefill (``Transformer.prefill_step``) passes as its cache: the prompt attends to itself
    only (an empty cache), and each layer's keys and values are collected in ``new_k``, ``new_v`` (one
    (B, H_kv, T, D) per layer) for the caller to write into a KVCache."""

    def __init__(self):
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []


def attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Boolean mask (B, 1, T_q, T_k) for queries at positions start.. that may see key j when j <= query position
    and key j is real. Each query also sees itself, so a padding query never has an empty row (which would give NaN).
    valid: (B, T_k)."""
    t_k = valid.shape[1]
    q_pos = torch.arange(start, t_k, device=valid.device).unsqueeze(1)
    k_pos = torch.arange(t_k, device=valid.device).unsqueeze(0)
    causal = k_pos <= q_pos  # (T_q, T_k)
    return (causal & valid[:, None, None, :]) | (k_pos == q_pos)


SHORT_KEYS = {torch.bfloat16: 128, torch.float16: 128, torch.float32: 64, torch.float64: 64}
"""On CPU, attention that autograd will differentiate over at most this many keys (by dtype) is written out."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q·kᵀ/√D + mask)·v. q: (B, H, T_q, D); k, v: (B, H, T_k, D); mask: (B, 1, T_q, T_k) bool (True = may
    attend) or None; causal (only with T_q = T_k and no mask): the causal mask.

    ``scaled_dot_product_attention``, except on CPU when gradients will flow over few keys (``SHORT_KEYS``): there
    torch's fused CPU kernel is slow forward + backward and the same maths written out (``_short_attention``) is
    not (``benchmarks/short_attention.py``, one layer, 2 threads: bf16 at GRPO's 32 × 4 heads × 43 tokens 0.31×
    the fused kernel's time compiled, 0.42× eager; float32 0.73×; at the demo's 128 tokens bf16 0.62× but float32
    1.04–1.25×, hence float32's lower limit). Written out, scores, softmax and the weighted sum run in float32
    (float64 for a float64 model), as the fused kernel accumulates."""
    short = k.shape[-2] <= SHORT_KEYS.get(q.dtype, 0)
    if not (q.device.type == "cpu" and short and q.requires_grad and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return _short_attention(q, k, v, mask, causal)[0]


# The written-out attention is an opaque operator with its own backward. Its float32 maths needs autocast off, and a
# graph that switches autocast inside is never stored in torch 2.13's compile cache (its AOTAutograd stage bypasses
# the cache for `_enter_autocast`): every process would re-trace the training step for ~10 s. Opaque, the switch
# stays inside the operator; compiled or not, it runs these few eager operations (as fast as inductor's fusion here).


def _float(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@torch.library.custom_op("nanoseek::short_attention", mutates_args=())
def _short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (softmax(q·kᵀ/√D + mask)·v in q's dtype, the attention weights P (B, H, T_q, T_k) in float32 / float64)."""
    dtype = _float(q)
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            t = q.shape[-2]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(-1)
        return (probs @ v.to(dtype)).to(q.dtype), probs


@torch.library.custom_op("nanoseek::short_attention_backward", mutates_args=())
def _short_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With S = q·kᵀ/√D, P = softmax(S), O = P·v and G = dL/dO: dv = Pᵀ·G, dP = G·vᵀ, dS = P ⊙ (dP - Σ_j dP ⊙ P),
    dq = dS·k/√D, dk = dSᵀ·q/√D (masked entries have P = 0, hence dS = 0)."""
    dtype, scale = probs.dtype, q.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        g = grad.to(dtype)
        dv = probs.transpose(-1, -2) @ g
        dp = g @ v.to(dtype).transpose(-1, -2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        dq = (ds @ k.to(dtype)) * scale
        dk = (ds.transpose(-1, -2) @ q.to(dtype)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_short_attention.register_fake
def _(q, k, v, mask, causal):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1] + k.shape[-2:-1], dtype=_float(q))


@_short_attention_backward.register_fake
def _(grad, q, k, v, probs):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _short_attention_setup(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, _, _ = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.mark_non_differentiable(output[1])  # the weights are returned for backward's use, not to differentiate


def _short_attention_grad(ctx, grad: torch.Tensor, _grad_probs: torch.Tensor):
    q, k, v, probs = ctx.saved_tensors
    return *_short_attention_backward(grad, q, k, v, probs), None, None


_short_attention.register_autograd(_short_attention_grad, setup_context=_short_attention_setup)


# FLOPs, for torch.utils.flop_counter.FlopCounterMode (opaque operators are invisible to it otherwise): the forward's
# two matmuls; the backward's four (the weights are kept, not recomputed)
@register_flop_formula(torch.ops.nanoseek.short_attention)
def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    (b, h, t_q, d), t_k, d_v = q_shape, k_shape[-2], v_shape[-1]
    return 2 * b * h * t_q * t_k * (d + d_v)


@register_flop_formula(torch.ops.nanoseek.short_attention_backward)
def _(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    (b, h, t_q, d), t_k, d_v = q_shape, k_shape[-2], v_shape[-1]
    return 4 * b * h * t_q * t_k * (d + d_v)


class CausalSelfAttention(nn.Module):
    matmul_weights = ("q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight")
    """Parameters used only by matmuls autocast runs in low precision (``Transformer.autocast_weight_names``)."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: KVCache | DecodeSlots | NewKeys | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, T, C); rope: (2, T, D/2); mask: (B, 1, T, T_k) bool or None for plain causal attention
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H_kv, T, D) each
        q, k = apply_rotary(self.q_norm(q), rope), apply_rotary(self.k_norm(k), rope)
        if isinstance(cache, DecodeSlots):
            return self.proj(self._decode_attention(q, k, v, cache).transpose(1, 2).reshape(b, t, -1))
        if isinstance(cache, NewKeys):
            cache.new_k.append(k)
            cache.new_v.append(v)
            cache = None
        if cache is not None:
            end = cache.pos + t
            cache.k[self.layer_index, :, :, cache.pos : end] = k
            cache.v[self.layer_index, :, :, cache.pos : end] = v
            k, v = cache.k[self.layer_index, :, :, :end], cache.v[self.layer_index, :, :, :end]
        k, v = self._repeat_kv(k, v)
        causal = mask is None and (cache is None or cache.pos == 0)
        y = attend(q, k.to(q.dtype), v.to(q.dtype), mask, causal and t > 1)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def _decode_attention(self, q, k, v, slots: DecodeSlots) -> torch.Tensor:
        """softmax(q·[K; k]ᵀ/√D)·[V; v] for one query per row: the cached keys K under the mask, then the new key k
        (always seen). Written out rather than SDPA: compiled, it fuses into a few loops with no fixed kernel cost.
        q: (B, H, 1, D); k, v: (B, H_kv, 1, D) -> (B, H, 1, D)."""
        cache_k, cache_v = slots.k[self.layer_index], slots.v[self.layer_index]  # (B, H_kv, T_max, D)
        slots.new_k.append(k)
        slots.new_v.append(v)
        cache_k, cache_v, k, v = self._repeat_kv(cache_k, cache_v, k, v)
        scale = self.head_dim**-0.5
        scores = (q @ cache_k.to(q.dtype).transpose(-1, -2)) * scale  # (B, H, 1, T_max)
        scores = scores.masked_fill(~slots.mask, float("-inf"))
        own = (q * k.to(q.dtype)).sum(-1, keepdim=True) * scale  # (B, H, 1, 1)
        weights = torch.cat((scores, own), dim=-1).softmax(-1)
        return weights[..., :-1] @ cache_v.to(q.dtype) + weights[..., -1:] * v.to(q.dtype)

    def _repeat_kv(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Grouped-query attention: each of the H_kv key / value heads serves H / H_kv query heads, (B, H_kv, T, D)
        -> (B, H, T, D); unchanged when H_kv = H."""
        if self.kv_heads == self.n_heads:
            return tensors
        return tuple(x.repeat_interleave(self.n_heads // self.kv_heads, dim=1) for x in tensors)
