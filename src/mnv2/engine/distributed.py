"""torchrun support: the same training command runs in one process or in N (DistributedDataParallel).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process and every helper is a no-op.
Backend: NCCL on GPUs, gloo on CPUs. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PeerError, UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# How long a rank waits in a collective for its peers before the job fails with an error rather than hangs. Ranks
# agree on stopping (`first_error`), so this is the backstop for a peer that died; rank 0 alone writes checkpoints and
# runs COCOeval while the others wait at a barrier, which stays well under it. MNV2_DIST_TIMEOUT (seconds) sets it.
TIMEOUT_S = 600


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun described in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":  # one GPU per local rank, before NCCL's first collective
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = float(os.environ.get("MNV2_DIST_TIMEOUT", TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def first_error(error: str | None, ctx: Dist) -> str | None:
    """Agree on stopping: every rank calls this at the same point with its own error message (None if all is well);
    all get back the message of the lowest failing rank, or None when no rank failed. One tiny all-reduce when all
    are well, so a rank that fails never leaves its peers waiting in the next collective."""
    if not ctx.enabled:
        return error
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([0 if error is None else 1], device=on)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if not failed.item():
        return None
    messages = [None] * ctx.world_size
    dist.all_gather_object(messages, error)
    return next(m for m in messages if m is not None)


def raise_first_error(error: str | None, ctx: Dist) -> None:
    """`first_error`, raised on every rank when there is one: rank 0 reports it (`PeerError` elsewhere, which the
    CLI does not print, so the job ends with the original error once)."""
    message = first_error(error, ctx)
    if message is not None:
        raise (UserError if ctx.is_main or not ctx.enabled else PeerError)(message)


def all_reduce_sum(tensor: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum a tensor of statistics over ranks (in place; returns it)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj, ctx: Dist) -> list | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None elsewhere. For results that do not sum, such as
    a detector's per-image detections."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, ctx: Dist):
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
