"""The engine: what every stage's optimizer update needs, set up once from ``[train]``.

A stage (pretraining, SFT, GRPO, distillation) computes losses; the engine does the rest, the same way for all:

* **placement**: the process group and device (``distributed.setup``), CPU threads, the model on the device;
* **the forward**: ``torch.compile`` (train.compile), then DDP or FSDP2 (train.parallel) around it; bf16
  autocast (train.dtype) around every micro-batch the stage runs through ``update`` and around ``autocast()``;
* **an update** (``update``): the stage's micro-batch closures, each run forward and backward with gradient sync
  only on the last (train.grad_accum of them, usually), then the NaN guard on the loss and the gradient norm,
  clipping (train.grad_clip; inside the fused AdamW kernel's own pass where it runs), every optimizer (AdamW, or
  Muon + AdamW: train.optimizer), the NaN guard on the updated weights (train.on_nan: stop, or skip = undo the
  update), and the post-step hooks — MoE balancing, with the expert loads summed over micro-batches and processes
  here, outside the model;
* **the lr schedule** (``set_lr``), laid out over train.steps.

The run loop around it (run folder, metrics, checkpoints, resume, Ctrl-C, time budget) is ``nanoseek.train.loop``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.model import Transformer
from nanoseek.train import distributed
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import Dist
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr
from nanoseek.train.threads import configure_threads


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss with on_nan='stop'); the message names the step."""


@dataclass
class Update:
    """What an optimizer update did: the loss (summed over its micro-batches, averaged over processes), the
    gradient norm before clipping, and whether it was skipped (non-finite, with on_nan='skip')."""

    loss: float
    grad_norm: float
    skipped: bool = False


class Engine:
    def __init__(self, model: Transformer, cfg: TrainConfig, dist: Dist | None = None, log: Callable = print):
        self.cfg, self.log = cfg, log
        self.dist = dist or distributed.setup(cfg.device)
        configure_threads(cfg.threads, self.dist.world, log)
        self.model = model.to(self.dist.device)
        self.forward = distributed.parallelize(self.model, cfg.parallel, cfg.compile, self.dist)
        self.optimizers = build_optimizers(self.model, cfg)  # after sharding: FSDP replaces the parameters
        self.skipped, self.updates, self._label = 0, 0, "step ?"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        """bf16 autocast when train.dtype says so (a no-op context otherwise)."""
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def set_lr(self, step: int) -> float:
        """The schedule's learning rate for stage step ``step`` (0-based), applied to every optimizer."""
        self._label = f"step {step + 1}"
        return set_lr(self.optimizers, lr_factor(step, self.cfg))

    # -----------------------------------------------------------------------------------------------------------------

    def update(self, micro_batches: Sequence[Callable[[], torch.Tensor]]) -> Update:
        """One optimizer update. Each closure runs a micro-batch forward (through ``self.forward``, under autocast)
        and returns its loss, already scaled so that the closures' losses add up to the update's loss (e.g. each
        divided by the number of micro-batches)."""
        total = torch.zeros((), device=self.device)
        for i, closure in enumerate(micro_batches):
            with distributed.gradient_sync(self.forward, sync=i == len(micro_batches) - 1), self.autocast():
                loss = closure()
            loss.backward()
            total += loss.detach().float()
        loss = self.dist.mean(total).item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = gradient_norm(params)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return self._non_finite(f"loss={loss}" if not math.isfinite(loss) else f"gradient norm={norm}", loss, norm)
        snapshot = self._snapshot() if self.cfg.on_nan == "skip" else None
        step_clipped(self.optimizers, norm, self.cfg.grad_clip)
        if not self.dist.broadcast_flag(not _finite(list(self.model.parameters()))):
            self._zero_grad()
            balance_experts(self.model, self.dist)
            self.updates += 1
            return Update(loss, norm)
        if snapshot is not None:
            self._restore(snapshot)
        return self._non_finite("weights after the update (the learning rate may be too large)", loss, norm)

    def _non_finite(self, what: str, loss: float, norm: float) -> Update:
        self._zero_grad()
        reset_expert_loads(self.model)  # the loads of a discarded update are not counted
        if self.cfg.on_nan == "stop":
            raise TrainingError(
                f"non-finite {what} at {self._label}: training stopped and no checkpoint was written from these "
                "weights (set train.on_nan='skip' to skip such updates, or lower train.lr)"
            )
        self.skipped += 1
        self.log(f"{self._label}: non-finite {what}, update skipped ({self.skipped} so far)")
        return Update(loss, norm, skipped=True)

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _snapshot(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Weights and optimizer states before an update, so on_nan='skip' can undo one that went non-finite."""
        weights = [p.detach().clone() for p in self.model.parameters()]
        return weights, [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]

    @torch.no_grad()
    def _restore(self, snapshot: tuple[list[torch.Tensor], list[dict]]) -> None:
        weights, states = snapshot
        for p, w in zip(self.model.parameters(), weights, strict=True):
            p.copy_(w)
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)

    # -----------------------------------------------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict]:
        """(full weights, full optimizer state) on the CPU for a checkpoint; every process must call it."""
        return distributed.full_state(self.model, self.optimizers)

    def load_state(self, weights: dict, optimizer_state: dict) -> None:
        distributed.load_full_state(self.model, self.optimizers, weights, optimizer_state)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _item(t: torch.Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _finite(params: list[nn.Parameter]) -> bool:
    """Every parameter (this process's shard of it) finite. First the sum of each tensor: a sum with an infinite
    or NaN term is never finite, so finite sums prove every element finite, in the cheapest pass over the weights
    there is. A non-finite sum may also be an overflow of finite values, so then the exact test decides: each
    tensor's min and max (NaN propagates through both), one pass per tensor without a temporary copy."""
    local = [t for t in (_local(p.detach()) for p in params) if t.numel()]
    if not local or bool(torch.stack([t.sum() for t in local]).isfinite().all()):
        return True
    return bool(torch.stack([torch.stack(torch.aminmax(t)).float() for t in local]).isfinite().all())


DOT_DTYPES = (torch.float32, torch.float64)


def gradient_norm(params: list[nn.Parameter]) -> float:
    """The L2 norm of all the parameters' gradients together (of the full gradients, for FSDP's sharded ones),
    as ``torch.nn.utils.get_total_norm`` computes it. For plain float32 / float64 gradients each tensor's squared
    norm is a BLAS dot product with itself, which on a CPU reads the gradients about twice as fast as torch's norm
    kernels; sharded or other gradients go to torch."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(hasattr(g, "to_local") or g.dtype not in DOT_DTYPES or g.device.type != "cpu" for g in grads):
        return _item(torch.nn.utils.get_total_norm(grads))
    squares = [torch.dot(flat, flat).double() for flat in (g.reshape(-1) for g in grads)]
    norm = math.sqrt(float(torch.stack(squares).sum()))
    # a float32 square overflows at a norm of about 1.8e19, where torch's kernels still give a finite norm
    return norm if math.isfinite(norm) else _item(torch.nn.utils.get_total_norm(grads))


def step_clipped(optimizers: Sequence[torch.optim.Optimizer], norm: float, clip: float) -> None:
    """Every optimizer's step with the gradients scaled to norm at most ``clip`` (0: no clipping), by the factor
    ``torch.nn.utils.clip_grad_norm_`` uses, clip / (norm + 1e-6), when that is below 1. An optimizer running
    torch's fused kernel takes the scale inside its own pass over the gradients (the ``grad_scale`` it divides
    them by, the attribute torch's GradScaler sets for the same kernels), which saves a pass over every gradient;
    the others get their gradients multiplied first, and so do float64 parameters, as the kernel's scale is a
    float32."""
    factor = clip / (norm + 1e-6) if clip > 0 else 1.0
    for opt in optimizers:
        if factor >= 1.0:
            opt.step()
        elif _scales_in_its_kernel(opt):
            opt.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32)
            try:
                opt.step()
            finally:
                del opt.grad_scale
        else:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, factor)
            opt.step()


def _scales_in_its_kernel(opt: torch.optim.Optimizer) -> bool:
    fused = getattr(opt, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in opt.param_groups)
    return fused and all(p.dtype != torch.float64 for g in opt.param_groups for p in g["params"])


# ---------------------------------------------------------------------------------------------------------------------
# Post-step hooks


@torch.no_grad()
def balance_experts(model: Transformer, d: Dist) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing after an optimizer update: each MoE layer's token loads,
    counted since the last update over its micro-batches, are summed over processes (one all-reduce for all
    layers) and move the layer's biases (``MoE.update_bias``). Every process applies the same update to the same
    global loads, so the biases stay identical. A no-op for a dense model."""
    layers = model.moe_layers()
    if not layers:
        return
    loads = d.sum(torch.stack([m.load.to(d.device) for m in layers]))  # (L, E) int64
    for m, load in zip(layers, loads, strict=True):
        m.update_bias(load)


def reset_expert_loads(model: Transformer) -> None:
    for m in model.moe_layers():
        m.load = torch.zeros_like(m.load)
