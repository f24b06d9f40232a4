"""The language model: token embedding -> blocks (attention site, FFN site) -> final RMSNorm -> LM head.

Each site is a residual connection (plain, HC or mHC, see residual.py) around its block function. With HC and mHC
the residual state is n streams per token, x: (B, T, n, C): created by copying the embedding and collapsed back to
(B, T, C) before the final norm. With ffn="moe" the FFN of blocks first_k_dense.. is DeepSeekMoE (moe.py): the
training engine balances its experts after every optimizer step (``moe_layers()``, ``MoE.update_bias``), and in
training mode the loss returned with targets includes the MoE layers' sequence-wise balance losses (seq_aux_loss);
in eval mode it is the cross-entropy alone, comparable with a dense model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.model.attention import (
    CausalSelfAttention,
    DecodeSlots,
    KVCache,
    NewKeys,
    attention_mask,
    rotary_at,
    rotary_tables,
)
from nanoseek.model.config import ModelConfig
from nanoseek.model.ffn import make_ffn
from nanoseek.model.moe import MoE
from nanoseek.model.residual import RESIDUALS, Residual, make_residual


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn = make_residual(cfg, CausalSelfAttention(cfg, index), 2 * index)
        self.moe = cfg.ffn == "moe" and index >= cfg.first_k_dense
        self.ffn = make_residual(cfg, MoE(cfg, index) if self.moe else make_ffn(cfg), 2 * index + 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
        x = self.attn(x, **attn_kwargs)
        return self.ffn(x, valid=valid) if self.moe else self.ffn(x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.residual_kind = RESIDUALS[cfg.residual]
        self.collapse = self.residual_kind.collapse(cfg)  # residual state -> (B, T, C); nn.Identity for plain
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, init_std) for embeddings and block matrices (MoE experts and router included); output
        projections scaled by 1/sqrt(2·L) so the residual stream's variance does not grow with depth (GPT-2).
        Attention biases (qkv_bias) start at zero; norm gains and residual-connection parameters keep the
        initialisation their classes chose."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            for site in (block.attn, block.ffn):
                for name, p in site.fn.named_parameters():
                    if name.endswith(".bias"):  # qkv_bias: start at zero, as Qwen2 does
                        nn.init.zeros_(p)
                    if p.dim() < 2:
                        continue
                    output = name.removesuffix(".weight").rsplit(".", 1)[-1] in ("proj", "down")
                    nn.init.normal_(p, std=std * (1 / math.sqrt(2 * self.cfg.n_layers) if output else 1.0))

    def residual_sites(self) -> list[Residual]:
        """The 2·n_layers residual connections, bottom to top."""
        return [site for block in self.blocks for site in (block.attn, block.ffn)]

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters that are small coefficient tables, not weight matrices: the residual connections' own, the
        stream collapse's and the MoE routers (the optimizer never decays them)."""
        sites = [p for site in self.residual_sites() for p in site.no_decay_parameters()]
        return sites + list(self.collapse.parameters()) + [m.router.weight for m in self.moe_layers()]

    def moe_layers(self) -> list[MoE]:
        """The MoE FFNs, bottom to top (empty for a dense model)."""
        return [block.ffn.fn for block in self.blocks if isinstance(block.ffn.fn, MoE)]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        temperature: float = 1.0,
        chunk: int = 64,
    ):
        """idx: (B, T) token ids. Returns

        * logits (B, T, vocab), without targets;
        * (logits, loss) with targets (B, T) (target -1 is ignored);
        * with ``positions`` (B, P) and targets (B, P): (log-probabilities, entropies), each (B, P) float32, of token
          targets[b, j] predicted at position positions[b, j] under softmax(logits / temperature) — what policy
          gradients need, computed ``chunk`` positions at a time (recomputed in backward) so that (B, P, vocab)
          float32 logits never exist. The entropy carries no gradient.

        With ``cache`` the tokens continue the cached positions. ``pad_mask`` (B, T) marks real tokens (False =
        padding): never attended to when it precedes real tokens (left padding), and left out of the MoE loads and
        balance loss; right padding needs no attention mask, since causal attention never looks ahead."""
        h = self.hidden_states(idx, cache, pad_mask)
        if positions is not None:
            return self._scores(h, positions, targets, temperature, chunk)
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, (loss + self.balance_loss() if self.training else loss)

    def balance_loss(self) -> torch.Tensor | float:
        """Sum of the MoE layers' sequence-wise balance losses of the last training forward (0 when there are none)."""
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(aux).sum() if aux else 0.0

    def _scores(self, h, positions, targets, temperature, chunk):
        # h: (B, T, C); positions, targets: (B, P)
        h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))  # (B, P, C)
        logps, entropies = [], []
        # one chunk needs no loop over the length, so a compiled forward does not specialise on it
        spans = [slice(None)] if h.shape[1] <= chunk else [slice(s, s + chunk) for s in range(0, h.shape[1], chunk)]
        for span in spans:
            args = (h[:, span], targets[:, span], temperature)
            grad = h.requires_grad
            lp, ent = checkpoint(self._chunk_scores, *args, use_reentrant=False) if grad else self._chunk_scores(*args)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps, dim=1), torch.cat(entropies, dim=1)

    def _chunk_scores(self, h: torch.Tensor, targets: torch.Tensor, temperature: float):
        logits = self.lm_head(h)  # (B, c, V): one chunk only
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, targets[..., None])[..., 0], entropy

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The LM head's input (B, T, C), after the final norm. Callers that need log-probabilities of many positions
        apply ``lm_head`` to chunks of it, so (B, T, vocab) logits never exist at once."""
        b, t = idx.shape
        start = cache.pos + cache.offset if cache is not None else 0
        if cache is None and start + t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.cfg.seq_len}")
        rope = rotary_tables(self.cfg.head_dim, start, t, self.cfg.rope_base, idx.device)
        if cache is not None:
            mask = cache.mask(t, pad_mask)
        elif pad_mask is not None and (torch.compiler.is_compiling() or not _right_padded(pad_mask)):
            # compiled, a right-padded batch gets the mask too (the same attention for its real tokens): a branch on
            # the data would break the graph, and every graph after the break would compile once per batch size
            mask = attention_mask(pad_mask, 0)
        else:
            mask = None
        x = self.residual_kind.expand(self.embed(idx), self.cfg)  # (B, T, C), or (B, T, n, C) streams
        for block in self.blocks:
            x = block(x, valid=pad_mask, rope=rope, cache=cache, mask=mask)
        if cache is not None:
            cache.pos += t
        return self.norm(self.collapse(x))

    @property
    def exportable(self) -> bool:
        """Whether ``decode_step`` traces into one whole graph (``torch.export``): not with MoE layers, whose
        grouped dispatch runs ``grouped_mm`` eagerly outside any graph (its meta kernel in torch 2.13 takes bf16
        only) and whose loop dispatch gives each expert a data-dependent number of rows."""
        return self.cfg.ffn != "moe"

    def decode_step(
        self,
        tokens: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        slot: torch.Tensor,
        position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row over a KV cache given as tensors: tokens (B,) going to cache slot ``slot`` with rotary
        position ``position`` (0-dim long tensors); k, v (L, B, H_kv, T, D) and valid (B, T) are a KVCache's tensors
        (all T_max slots, or only the T = slot filled ones), read only. Returns the next logits (B, vocab) and the
        new keys and values (L, B, H_kv, 1, D) for the caller to write at ``slot`` (``generate.decode_next`` does).
        The same numbers as ``forward`` with that cache, up to float rounding, but the position is a tensor, not a
        Python int, so torch.compile compiles it once for a whole generation and every later one."""
        filled = torch.arange(valid.shape[1], device=valid.device) < slot
        mask = (valid & filled)[:, None, None, :]  # (B, 1, 1, T_max): the real slots before this one
        rope = rotary_at(self.cfg.head_dim, position.view(1), self.cfg.rope_base)  # (2, 1, D/2)
        slots = DecodeSlots(k, v, mask)
        x = self.residual_kind.expand(self.embed(tokens[:, None]), self.cfg)
        for block in self.blocks:
            x = block(x, rope=rope, cache=slots)
        logits = self.lm_head(self.norm(self.collapse(x)))[:, -1]
        return logits, torch.stack(slots.new_k), torch.stack(slots.new_v)

    def prefill_step(
        self, tokens: torch.Tensor, valid: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prompts into an empty KV cache: tokens, valid (B, T) (False for padding), the first column at
        rotary position ``position`` (a 0-dim long tensor). Returns the last column's logits (B, vocab) and every
        layer's keys and values (L, B, H_kv, T, D) for the caller to store as the cache's first T slots. The same
        numbers as ``forward`` with an empty cache (offset ``position``), up to float rounding, as a function of
        tensors alone, so torch.compile compiles it once for every prompt length and batch size."""
        positions = position + torch.arange(tokens.shape[1], device=tokens.device)
        rope = rotary_at(self.cfg.head_dim, positions, self.cfg.rope_base)
        mask = attention_mask(valid, 0)
        keys = NewKeys()
        x = self.residual_kind.expand(self.embed(tokens), self.cfg)
        for block in self.blocks:
            x = block(x, valid=valid, rope=rope, cache=keys, mask=mask)
        logits = self.lm_head(self.norm(self.collapse(x))[:, -1])
        return logits, torch.stack(keys.new_k), torch.stack(keys.new_v)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., vocab)."""
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)

    # -----------------------------------------------------------------------------------------------------------------
    # Analytic size and cost

    def _ffn_params(self, active: bool) -> int:
        """Matmul weights of all FFNs. An MoE layer holds its router, shared and routed experts; of the routed
        ones only top_k are *active* for a given token (dropless routing: always exactly top_k)."""
        c = self.cfg
        dense = (2 if c.ffn == "relu2" else 3) * c.d_model * c.hidden
        if c.ffn != "moe":
            return c.n_layers * dense
        experts = c.n_shared_experts + (c.top_k if active else c.n_routed_experts)
        moe = c.n_routed_experts * c.d_model + experts * 3 * c.d_model * c.expert_width
        return c.first_k_dense * dense + (c.n_layers - c.first_k_dense) * moe

    def autocast_weight_names(self) -> list[str]:
        """Names of the parameters that serve only as matmul weights autocast computes in its low precision — the
        attention and feed-forward projections, the routed experts, an untied head (each module lists its own in a
        ``matmul_weights`` attribute). Under autocast, a copy of the model that stores these in autocast's dtype
        computes the same numbers without casting them again at every call, which a compiled decode step otherwise
        does for every token. Everything else stays float32 by design: embeddings (the tied head too), norms, the
        MoE router (float32 with autocast off) and the residual streams' coefficients (DESIGN.md §3)."""
        names = ["head.weight"] if self.head is not None else []
        for prefix, module in self.named_modules():
            listed = getattr(module, "matmul_weights", ())
            names += [f"{prefix}.{name}" for name, _ in module.named_parameters() if name in listed]
        return names

    def num_params(self, active: bool = False) -> int:
        """Parameter count from the config alone (a test checks it against the real tensors). ``active=True``
        counts the parameters one token uses: an MoE layer's idle routed experts are left out."""
        c = self.cfg
        d, hd = c.d_model, c.head_dim
        attn = d * c.n_heads * hd + 2 * d * c.kv_heads * hd + c.n_heads * hd * d + (2 * hd if c.qk_norm else 0)
        attn += (c.n_heads + 2 * c.kv_heads) * hd if c.qkv_bias else 0
        head = 0 if c.tie_embeddings else c.vocab_size * d
        residual = self.residual_kind.num_params(c)  # norms and coefficients of every site, the stream collapse
        return c.vocab_size * d + head + c.n_layers * attn + self._ffn_params(active) + residual + d

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6 per matmul weight, plus attention and stream mixing.

        * matmul weights: attention and FFN projections, the LM head; the embedding lookup is not a matmul. MoE
          layers count the router and the *active* experts only (shared + top_k routed), not the idle ones;
          routing, sorting and gate weighting are not matmuls and are left out;
        * attention: scores and weighted values over the full T×T square, 2·2·T·C forward per token and layer
          (the usual convention, as in Kaplan et al.; a causal kernel could skip half);
        * the residual connections, as their kind reports them (residual.py): for hc and mhc their coefficient
          maps (mHC's φ, HC's W applied to each of the n streams), the learned collapse and the stream mixing.
        Backward costs twice the forward, hence the factor 3 on every forward count. To cross-check an MoE model
        with FlopCounterMode use moe_dispatch="loop": the counter sees its per-expert matmuls but counts
        torch.nn.functional.grouped_mm as 0 FLOPs (torch 2.13)."""
        c = self.cfg
        t = seq_len or c.seq_len
        d = c.d_model
        attn = d * c.n_heads * c.head_dim + 2 * d * c.kv_heads * c.head_dim + c.n_heads * c.head_dim * d
        matmul = c.n_layers * attn + self._ffn_params(active=True) + c.vocab_size * d
        attention = c.n_layers * 2 * 2 * t * c.n_heads * c.head_dim
        return 3 * (2 * matmul + attention) + self.residual_kind.flops_per_token(c)


def _right_padded(pad_mask: torch.Tensor) -> bool:
    """Every row is real tokens then padding (so plain causal attention is exact for the real ones)."""
    return bool((pad_mask.cumprod(dim=1, dtype=torch.int8) == pad_mask).all())
