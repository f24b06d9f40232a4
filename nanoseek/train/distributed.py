"""Processes and devices: ``torchrun`` process groups (gloo on CPU, NCCL on CUDA), DDP or FSDP2 around a plain
model, and full (unsharded) state dicts for checkpoints. A single process needs none of it.

The model never knows it is distributed: it is wrapped here from outside (torchtitan's rule), and the few
collectives training needs (loss means, stop flags, MoE expert loads) are methods of ``Dist``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.inductor import prepare_in_background


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Only the main process logs, writes metrics and checkpoints."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (identity in a single process)."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes (identity in a single process)."""
        return self.sum(value) / self.world if self.world > 1 else value

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every process when it is true on any (e.g. a stop request or a time budget)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE set), and choose the device."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown() -> int:
    """Leave the process group, if this process joined one (``nanoseek.cli`` calls it when a command returns).
    Returns how many processes the group had (0: none was joined)."""
    if not dist.is_initialized():
        return 0
    world = dist.get_world_size()
    dist.destroy_process_group()
    return world


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism


def parallelize(model: nn.Module, parallel: str, compile: bool, d: Dist) -> nn.Module:
    """The module to call for training: ``model`` (compiled if asked) in one process; with several,
    DistributedDataParallel around it (ddp), or FSDP2's ``fully_shard`` on every block and then the root (fsdp:
    ``model`` is sharded in place, its parameters replaced by sharded ones, then compiled if asked)."""
    if d.world > 1 and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return _compile(model, d) if compile else model
    compiled = _compile(model, d) if compile else model
    if d.world == 1:
        return compiled
    ids = [d.local_rank] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(compiled, device_ids=ids)


def _compile(model: nn.Module, d: Dist) -> nn.Module:
    compiled = torch.compile(model)
    prepare_in_background(d.device.type)  # inductor's once-per-process CPU probes, overlapping the first trace
    return compiled


@contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool):
    """Within the context, the backward pass all-reduces (reduce-scatters) gradients only when ``sync``: the
    micro-batches before the last one of an accumulation just accumulate locally."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        with nullcontext():
            yield


def sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """(weights, optimizer state), unsharded and on the CPU, keyed by parameter name: what a checkpoint holds
    whatever the parallelism, so a one-process run reads an FSDP run's checkpoint. Every process must call it
    (FSDP gathers); the result is complete on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if not any(opt.state for opt in optimizers):  # nothing to save yet (and no fake step to initialise it)
        return weights, {}
    return weights, get_optimizer_state_dict(model, optimizers, options=options)


def load_full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], weights: dict, state: dict) -> None:
    """Inverse of ``full_state``: every process loads the full tensors and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if state:
        set_optimizer_state_dict(model, optimizers, state, options=options)
