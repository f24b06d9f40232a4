"""Causal self-attention: rotary position embeddings, grouped-query heads, optional QK-norm, SDPA, and a KV cache
for incremental decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal and t > 1)
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
