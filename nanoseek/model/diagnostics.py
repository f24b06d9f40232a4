"""Stability diagnostics of stream-mixing residuals: the mHC paper's "Amax gain magnitude", plus the minimum.

For a mixing map M acting on the streams (one site's H_res, or the product over depth), the forward gain is the
maximum absolute row sum of M (how much a signal can grow going up) and the backward gain the maximum absolute
column sum (how much a gradient can grow going down). Both are averaged over the tokens of the batch. The ideal is
1; the minimum row / column sum is reported as well, since a maximum near 1 can hide streams that shrink.
Every block counts as two layers (attention site, FFN site), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Gains:
    """Token-averaged gains of a mixing map: max / min absolute row sum (forward), max / min column sum (backward)."""

    forward_max: float
    forward_min: float
    backward_max: float
    backward_min: float


@dataclass
class ResidualGains:
    per_layer: list[Gains]
    """One entry per residual site, bottom to top."""
    composite: Gains
    """Gains of H_res^(L) ··· H_res^(1), the map the residual path applies from the embedding to the output."""
    composite_by_depth: list[Gains]
    """Composite gains of the first k sites, k = 1 .. L, to see whether they grow with depth."""


def matrix_gains(m: torch.Tensor) -> Gains:
    """Gains of mixing matrices m: (..., n, n), averaged over the leading (token) dimensions."""
    a = m.abs().double()
    rows, cols = a.sum(dim=-1), a.sum(dim=-2)  # (..., n)
    return Gains(
        forward_max=rows.amax(dim=-1).mean().item(),
        forward_min=rows.amin(dim=-1).mean().item(),
        backward_max=cols.amax(dim=-1).mean().item(),
        backward_min=cols.amin(dim=-1).mean().item(),
    )


def mixing_gains(h_res: list[torch.Tensor]) -> ResidualGains:
    """Gains of a list of per-site mixing matrices (..., n, n), bottom to top, all over the same tokens."""
    per_layer = [matrix_gains(h) for h in h_res]
    by_depth = []
    product = None
    for h in h_res:
        product = h.double() if product is None else h.double() @ product
        by_depth.append(matrix_gains(product))
    return ResidualGains(per_layer, by_depth[-1], by_depth)


@torch.no_grad()
def residual_gains(model: nn.Module, idx: torch.Tensor) -> ResidualGains | None:
    """Run ``model`` on token ids ``idx`` (B, T) and return the gains of every site's H_res and of their product,
    or None when no site mixes streams (a plain residual: its mixing map is the identity). Costs one forward pass
    and every site's coefficients once more."""
    sites = [s for s in model.residual_sites() if s.mixes_streams]
    if not sites:
        return None
    h_res: list[torch.Tensor] = []
    hooks = [s.register_forward_pre_hook(lambda site, args: h_res.append(site.mixing_matrix(args[0]))) for s in sites]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return mixing_gains(h_res)
