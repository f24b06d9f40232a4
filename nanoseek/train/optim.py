"""Optimizers and learning-rate schedules.

AdamW decays only weight matrices: norms, biases, gates, the small residual-connection coefficients and (unless
asked) the embedding are left alone, since decaying them pulls scales and gates toward zero for no benefit.
Muon (``torch.optim.Muon``, the orthogonalised-momentum optimizer of modded-nanogpt) takes the 2-D weight matrices of
the blocks; everything else — embedding, LM head, vectors, residual coefficients, MoE routers — stays with AdamW, as
Muon is only defined for hidden matrices. MoE expert weights are stacked (E, C, H) tensors: they are decayed like
matrices but stay with AdamW (torch's Muon takes 2-D parameters only; orthogonalising each expert separately is
left open). Muon uses ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling, arXiv 2502.16982), so
one learning rate serves both.

AdamW runs torch's fused kernel (``fused=True``: one pass over all parameters per update instead of about a dozen
tensor operations per parameter) wherever torch has it: unsharded parameters on CPU or CUDA. On a 2-core CPU the
per-parameter loop took most of an MoE model's step (4x the parameters of its dense twin at equal active size);
the fused update equals the loop's to rounding (tests/test_train.py compares them in float64). Sharded (FSDP)
parameters keep torch's default kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.model.transformer import Transformer
from nanoseek.train.config import TrainConfig


def param_groups(model: Transformer) -> dict[str, list[nn.Parameter]]:
    """Split parameters into 'matrices' (2-D block weights: decayed, Muon's when optimizer=muon), 'experts' (stacked
    MoE expert weights: decayed, AdamW), 'embeddings' and 'other' (never decayed, including the coefficient tables
    the model names in ``no_decay_parameters``: residual connections, stream collapse, MoE routers)."""
    coefficients = {id(p) for p in model.no_decay_parameters()}
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "experts": [], "embeddings": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block_weight = name.startswith("blocks.") and id(p) not in coefficients
        if block_weight and p.ndim == 2:
            groups["matrices"].append(p)
        elif block_weight and p.ndim == 3:
            groups["experts"].append(p)
        elif name.startswith(("embed.", "head.")):
            groups["embeddings"].append(p)
        else:
            groups["other"].append(p)
    return groups


FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def adamw_kernel(groups: list[dict]) -> dict:
    """``{"fused": True}`` when every parameter is a plain tensor torch's fused AdamW takes, else ``{}`` (torch's
    default choice)."""
    params = [p for g in groups for p in g["params"]]
    plain = all(
        not hasattr(p, "to_local") and p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params
    )  # to_local: an FSDP-sharded parameter (a DTensor)
    return {"fused": True} if params and plain else {}


def build_optimizers(model: Transformer, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    groups = param_groups(model)
    embed_decay = cfg.weight_decay if cfg.decay_embeddings else 0.0
    adam_groups = [
        {"params": groups["experts"], "weight_decay": cfg.weight_decay},
        {"params": groups["embeddings"], "weight_decay": embed_decay},
        {"params": groups["other"], "weight_decay": 0.0},
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(
                f"train.optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is {torch.__version__}"
            )
        optimizers.append(
            torch.optim.Muon(
                groups["matrices"], lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
            )
        )
    else:
        adam_groups.insert(0, {"params": groups["matrices"], "weight_decay": cfg.weight_decay})
    adam_groups = [g for g in adam_groups if g["params"]]
    adamw = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **adamw_kernel(adam_groups))
    optimizers.insert(0, adamw)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = cfg.lr
    return optimizers


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier for step ``step`` (0-based): linear warm-up to 1, then cosine down to min_lr_ratio,
    (wsd) constant and a linear decay over the last decay_fraction of the steps, or (constant) 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / (cfg.steps - decay_start)
    return 1 - (1 - cfg.min_lr_ratio) * min(progress, 1.0)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]
