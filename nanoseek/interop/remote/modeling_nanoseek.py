"""A nanoseek language model for transformers (load with ``trust_remote_code=True``): torch and transformers only.

token embedding -> blocks (attention site, FFN site) -> final RMSNorm -> LM head. Each site is a residual
connection around its block function F, which runs once per token on a C-vector:

  plain   x + F(RMSNorm(x))
  hc/mhc  n streams per token, x: (..., n, C):   x' = H_res · x + H_postᵀ · F(RMSNorm(H_pre · x))
          HC  (arXiv 2409.19606): static coefficients + s · tanh(RMSNorm(x_i) · W), per stream i
          mHC (arXiv 2512.24880, Eq. 7-9): [h_pre | h_post | h_res] = RMSNorm(vec(x)) · φ,
              H_pre = σ(α_pre h_pre + b_pre), H_post = 2σ(α_post h_post + b_post),
              H_res = SinkhornKnopp(α_res h_res + b_res)  (nearly doubly stochastic)
          streams start as copies of the embedding and are collapsed (mean, sum or learned weights) before the norm.

F is causal self-attention (rotary embedding rotate-half, grouped-query heads, optional QK-norm and q/k/v biases) or
an FFN: SwiGLU, ReLU², or DeepSeekMoE (sigmoid router; the bias only chooses the top-k experts; gate weights are the
chosen affinities renormalised, times route_scale; shared experts always on). Coefficients, stream mixing and the
router run in float32. Parameter names are nanoseek's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanoseek import NanoseekConfig

# ---------------------------------------------------------------------------------------------------------------------
# Attention


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}). x: (B, H, T, D); cos, sin: (B, 1, T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: NanoseekConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.kv_heads, self.head_dim = layer, c.n_heads, c.n_kv_heads, c.head_size
        self.q = nn.Linear(c.d_model, c.n_heads * c.head_size, bias=c.qkv_bias)
        self.kv = nn.Linear(c.d_model, 2 * c.n_kv_heads * c.head_size, bias=c.qkv_bias)  # k rows, then v rows
        self.proj = nn.Linear(c.n_heads * c.head_size, c.d_model, bias=False)
        self.q_norm = nn.RMSNorm(c.head_size, eps=c.norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(c.head_size, eps=c.norm_eps) if c.qk_norm else nn.Identity()

    def forward(self, x, rope, mask, cache):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H_kv, T, D) each
        q, k = rotate(self.q_norm(q), *rope), rotate(self.k_norm(k), *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------------------------------------------------------------
# Feed-forward blocks


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # gate rows, then up rows
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(swiglu(self.gate_up(x)))


class ReLU2(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


class Experts(nn.Module):
    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.zeros(n, dim, 2 * hidden))  # expert e: x @ gate_up[e]
        self.down = nn.Parameter(torch.zeros(n, hidden, dim))


class MoE(nn.Module):
    """DeepSeekMoE: s = σ(x · e_i); chosen = top-k of s + b; g = route_scale · s / Σ_chosen s."""

    def __init__(self, c: NanoseekConfig):
        super().__init__()
        self.top_k, self.route_scale = c.top_k, c.route_scale
        self.router = nn.Linear(c.d_model, c.n_routed_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(c.n_routed_experts))
        self.experts = Experts(c.n_routed_experts, c.d_model, c.expert_hidden)
        self.shared = SwiGLU(c.d_model, c.n_shared_experts * c.expert_hidden) if c.n_shared_experts else None

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (N, C)
        affinity = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))  # (N, E)
        chosen = torch.topk(affinity + self.expert_bias.float(), self.top_k, dim=-1).indices  # (N, k)
        s = affinity.gather(-1, chosen)
        weights = self.route_scale * s / s.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.experts.gate_up.shape[0]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                y = swiglu(x[rows] @ self.experts.gate_up[e]) @ self.experts.down[e]
                out.index_add_(0, rows, y * weights[rows, slot, None].to(y.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Residual connections


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp, then alternately columns and rows normalised to sum 1 (rows last, so rows are exact). (..., n, n)"""
    tiny = torch.finfo(logits.dtype).tiny
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + tiny)
        m = m / (m.sum(dim=-1, keepdim=True) + tiny)
    return m


class Plain(nn.Module):
    def __init__(self, fn: nn.Module, c: NanoseekConfig):
        super().__init__()
        self.norm, self.fn = nn.RMSNorm(c.d_model, eps=c.norm_eps), fn

    def forward(self, x, **kwargs):
        return x + self.fn(self.norm(x), **kwargs)


class Streams(nn.Module):
    """HC and mHC: subclasses give coefficients(x) -> H_pre (..., n), H_post (..., n), H_res (..., n, n)."""

    def __init__(self, fn: nn.Module, c: NanoseekConfig):
        super().__init__()
        self.norm, self.fn, self.n, self.eps = nn.RMSNorm(c.d_model, eps=c.norm_eps), fn, c.n_streams, c.norm_eps

    def forward(self, x, **kwargs):
        # x: (B, T, n, C)
        xf = x.float()
        h_pre, h_post, h_res = self.coefficients(xf)
        read = F.rms_norm(
            torch.einsum("...n,...nc->...c", h_pre, xf), (xf.shape[-1],), self.norm.weight.float(), self.eps
        )
        y = self.fn(read.to(x.dtype), **kwargs).float()  # (B, T, C)
        mixed = torch.einsum("...ij,...jc->...ic", h_res, xf) + h_post.unsqueeze(-1) * y.unsqueeze(-2)
        return mixed.to(x.dtype)


class HyperConnection(Streams):
    def __init__(self, fn: nn.Module, c: NanoseekConfig):
        super().__init__(fn, c)
        n = c.n_streams
        self.static_read = nn.Parameter(torch.zeros(n))  # A_m
        self.static_mix = nn.Parameter(torch.zeros(n, n))  # A_r
        self.static_write = nn.Parameter(torch.zeros(n))  # B
        self.dynamic = nn.Linear(c.d_model, n + 2, bias=False)  # columns: W_m | W_r (n) | W_β
        self.scale_alpha = nn.Parameter(torch.zeros(()))
        self.scale_beta = nn.Parameter(torch.zeros(()))

    def coefficients(self, x):
        d = torch.tanh(F.rms_norm(x, (x.shape[-1],), eps=self.eps) @ self.dynamic.weight.float().t())  # (..., n, n+2)
        a_m = self.static_read + self.scale_alpha * d[..., 0]
        a_r = self.static_mix + self.scale_alpha * d[..., 1 : self.n + 1]  # [i, j] from stream i
        b = self.static_write + self.scale_beta * d[..., -1]
        return a_m, b, a_r.transpose(-1, -2)


class ManifoldHyperConnection(Streams):
    def __init__(self, fn: nn.Module, c: NanoseekConfig):
        super().__init__(fn, c)
        n = c.n_streams
        self.sinkhorn_iters = c.sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(n * c.d_model, 2 * n + n * n))
        self.alpha = nn.Parameter(torch.zeros(3))  # α_pre, α_post, α_res
        self.b_pre, self.b_post, self.b_res = (nn.Parameter(torch.zeros(s)) for s in (n, n, (n, n)))

    def coefficients(self, x):
        n, flat = self.n, x.flatten(-2)  # (..., nC)
        h = F.rms_norm(flat, (flat.shape[-1],), eps=self.eps) @ self.phi.float()  # (..., 2n + n²)
        h_pre = torch.sigmoid(self.alpha[0] * h[..., :n] + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha[1] * h[..., n : 2 * n] + self.b_post)
        h_res = sinkhorn(self.alpha[2] * h[..., 2 * n :].unflatten(-1, (n, n)) + self.b_res, self.sinkhorn_iters)
        return h_pre, h_post, h_res


class Collapse(nn.Module):
    """(..., n, C) -> (..., C): mean, sum, or learned weights σ(RMSNorm(vec(x)) · W + b)."""

    def __init__(self, c: NanoseekConfig):
        super().__init__()
        self.mode, self.eps = c.stream_collapse, c.norm_eps
        if self.mode == "learned":
            self.proj = nn.Linear(c.n_streams * c.d_model, c.n_streams)

    def forward(self, x):
        if self.mode != "learned":
            return x.mean(dim=-2) if self.mode == "mean" else x.sum(dim=-2)
        flat = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), eps=self.eps)
        return torch.einsum("...n,...nc->...c", torch.sigmoid(self.proj(flat)), x)


RESIDUALS = {"plain": Plain, "hc": HyperConnection, "mhc": ManifoldHyperConnection}


class Block(nn.Module):
    def __init__(self, c: NanoseekConfig, i: int):
        super().__init__()
        residual = RESIDUALS[c.residual]
        if c.ffn == "moe" and i >= c.first_k_dense:
            ffn = MoE(c)
        else:
            ffn = (ReLU2 if c.ffn == "relu2" else SwiGLU)(c.d_model, c.ffn_hidden)
        self.attn = residual(Attention(c, i), c)
        self.ffn = residual(ffn, c)

    def forward(self, x, rope, mask, cache):
        return self.ffn(self.attn(x, rope=rope, mask=mask, cache=cache))


# ---------------------------------------------------------------------------------------------------------------------
# The model


class NanoseekForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoseekConfig
    base_model_prefix = "nanoseek"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: NanoseekConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.collapse = Collapse(c) if c.residual != "plain" else None
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        inv_freq = 1.0 / c.rope_base ** (torch.arange(0, c.head_size, 2, dtype=torch.float32) / c.head_size)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        """Weights always come from the checkpoint; the rotary frequencies are recomputed, not stored."""
        if module is self:
            c = self.config
            self.inv_freq.copy_(1.0 / c.rope_base ** (torch.arange(0, c.head_size, 2).float() / c.head_size))

    def get_input_embeddings(self):
        return self.embed

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )  # None (plain causal attention is exact) or a boolean (B, 1, T, T_k) mask
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        rope = (angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype))
        if self.collapse is not None:
            x = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.n_streams, x.shape[-1])  # (B, T, n, C)
        for block in self.blocks:
            x = block(x, rope, mask, past_key_values)
        if self.collapse is not None:
            x = self.collapse(x)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
