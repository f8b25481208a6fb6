"""Engine: the device and the fast path, decided in one place.

:func:`resolve_device` turns ``auto|cpu|cuda`` into a device once, at the boundary.
:class:`Engine` says how tensors go through a model on it: memory format, autocast
precision, batch size for inference. ``Engine.faithful()`` is the tutorial's plain fp32
NCHW arithmetic; ``Engine.fast(device)`` is what measured fastest there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from convnet.data import to_float
from convnet.errors import ConvnetError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ConvnetError: unknown name, or ``cuda`` asked for where none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConvnetError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}; "
                               "use --device cpu")
        return torch.device(name)
    raise ConvnetError(f"unknown --device {name!r}; choose one of: {', '.join(DEVICES)}")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the system.

    Every training step frees and reallocates the same activation buffers (12.8 MB each
    for the seed model at batch 128). With glibc's adaptive defaults these sizes can
    land on mmap/munmap or heap trimming, so each step pays page faults: on 2 cores half
    the CPU time went to the kernel and an epoch took 14 s instead of 8. Raising the mmap
    and trim thresholds keeps the buffers in the heap. A no-op (returning False) where
    the C library is not glibc. Called once by the command line, at start.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    one_gib = 1 << 30
    return bool(libc.mallopt(m_mmap_threshold, one_gib)) and bool(libc.mallopt(m_trim_threshold, 2 * one_gib))


@dataclass(frozen=True)
class Engine:
    """How a model computes on a device.

    Attributes:
        device: where the model, the data set and every batch live.
        channels_last: NHWC memory format for model and batches (faster convolutions
            on recent CPUs and on GPUs' tensor cores).
        autocast: a lower precision for the forward pass (``torch.bfloat16``), or
            ``None`` for plain fp32.
        infer_batch_size: images per forward pass when only predicting.
        rank, world_size: under torchrun, this process's rank and the number of
            processes (see :func:`init_distributed`); 0 and 1 otherwise.
    """

    device: torch.device
    channels_last: bool = False
    autocast: torch.dtype | None = None
    infer_batch_size: int = 128
    rank: int = 0  # this process's place among world_size data-parallel processes
    world_size: int = 1

    @classmethod
    def faithful(cls, device: torch.device | None = None) -> Engine:
        """The tutorial's arithmetic: fp32, NCHW, predictions in batches of 128."""
        return cls(device or torch.device("cpu"))

    @classmethod
    def fast(cls, device: torch.device | None = None) -> Engine:
        """The measured fast path for ``device`` (see ``convnet bench``)."""
        device = device or torch.device("cpu")
        if device.type == "cuda":
            return cls(device, channels_last=True, autocast=torch.bfloat16, infer_batch_size=10_000)
        # Measured on 2 cores with AVX512-BF16, seed model, batch 128: channels_last 1.14x, bf16
        # autocast 1.6x, both 2.1x over plain fp32; torch.compile was slower. Without native bf16
        # instructions autocast emulates it slowly, so it is used only where the CPU has them.
        # Inference is fastest in batches of 128 here: larger ones fall out of the caches
        # (seed model, bf16: 48k images/s at 128, 33k at 512, 14k at 2048).
        return cls(device, channels_last=True, autocast=torch.bfloat16 if cpu_has_bf16() else None,
                   infer_batch_size=128)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, in the engine's memory format."""
        return model.to(device=self.device, memory_format=self.memory_format)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` anywhere -> float in [0, 1] on the device, in the engine's layout."""
        x = to_float(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """The forward pass's autocast context (a no-op in fp32)."""
        if self.autocast is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                yield

    def describe(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "channels_last": self.channels_last,
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
            "infer_batch_size": self.infer_batch_size,
            "torch_threads": torch.get_num_threads(),
            "processes": self.world_size,
        }

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes files (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` inside DistributedDataParallel when there are several processes.

        Gradients are averaged across processes after each backward pass. Batch norm is
        synchronised across GPUs (SyncBatchNorm); on CPU (gloo) PyTorch has no
        synchronised batch norm, so each process normalises its own share of the batch.
        """
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[self.device])
        return DistributedDataParallel(model)

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over all processes (``t`` itself in one process)."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size


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
    import datetime

    import torch.distributed as dist

    info = DistributedInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    # A rank that dies makes the others fail within the timeout instead of waiting forever.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    return info
