"""Several processes under torchrun: joining the process group, wrapping the model in
DistributedDataParallel, and averaging values across processes.

``--batch-size`` stays the global batch: every process takes its slice of each batch and
DDP averages the gradients, so a run means the same in one process or in many.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
from torch import nn

from convnet.models.engine import Engine


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    local_rank: int
    world_size: int


def init_distributed(device: str, env: dict[str, str]) -> DistributedInfo | None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or return
    ``None`` when not started by torchrun with more than one process.

    Args:
        device: the ``--device`` choice; ``auto``/``cuda`` use one GPU per process.
        env: the environment torchrun filled in (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
            ``MASTER_ADDR``, ``MASTER_PORT``), passed in by the command line.
    """
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    info = DistributedInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    # A rank that dies makes the others fail within the timeout instead of waiting forever.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    return info


def finish(info: DistributedInfo | None) -> None:
    """Meet the other processes at a barrier, then leave the process group."""
    if info is None:
        return
    import torch.distributed as dist

    try:
        dist.barrier()  # rank 0 evaluates after training: the others wait, so no process tears down early
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, engine: Engine) -> nn.Module:
    """``model`` inside DistributedDataParallel when there are several processes.

    Gradients are averaged across processes after each backward pass. Batch norm is
    synchronised across GPUs (SyncBatchNorm); on CPU (gloo) PyTorch has no
    synchronised batch norm, so each process normalises its own share of the batch.
    """
    if engine.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if engine.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[engine.device])
    return DistributedDataParallel(model)


def all_mean(t: torch.Tensor, engine: Engine) -> torch.Tensor:
    """Mean of ``t`` over all processes (``t`` itself in one process)."""
    if engine.world_size == 1:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / engine.world_size
