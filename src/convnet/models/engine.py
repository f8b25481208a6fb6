"""Engine: the device and the fast path, decided in one place.

:func:`make_engine` is the one factory every command uses: ``auto|cpu|cuda`` becomes a
device once, at the boundary, and ``faithful`` picks the tutorial's plain fp32 NCHW
arithmetic over the measured fast path. :class:`Engine` says how tensors go through a
model on that device: memory format, autocast precision, inference batch size, and
whether the training step runs eagerly or replays as a CUDA graph (:class:`StepRunner`).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from convnet.core.errors import ConvnetError
from convnet.core.options import DEVICES
from convnet.data.dataset import to_float


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ConvnetError: unknown name, or ``cuda`` asked for where none is available.
    """
    if isinstance(name, torch.device):
        return name
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
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or cpu_has_amx()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (Intel's matrix units; Sapphire Rapids and later)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")  # the ones
# that decide how fast a CPU computes fp32 and bf16


@functools.cache
def cpu_info() -> dict[str, object]:
    """This CPU's model name and which of :data:`CPU_FLAGS` it has (read from
    ``/proc/cpuinfo``; elsewhere the platform's name and no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return {"name": name, "flags": [f for f in CPU_FLAGS if f in flags]}


@dataclass(frozen=True)
class Engine:
    """How a model computes on a device.

    Attributes:
        device: where the model, the data set and every batch live.
        channels_last: NHWC memory format for model and batches (faster convolutions
            on recent CPUs and on GPUs' tensor cores).
        autocast: a lower precision for training's forward pass (``torch.bfloat16``), or
            ``None`` for plain fp32. Predicting never uses it (see :func:`exact_arithmetic`).
        infer_batch_size: images per forward pass when only predicting.
        graphs: capture the training step in a CUDA graph and replay it (CUDA only).
        fold_batchnorm: predict with batch norm folded into the convolutions before it
            (see :func:`convnet.models.networks.fold_batchnorm`); off for the tutorial's arithmetic.
        fuse_relu: predict with each convolution and the ReLU after it as one oneDNN call
            (:func:`convnet.models.networks.fuse_conv_relu`; the CPU only).
        rank, world_size: under torchrun, this process's rank and the number of
            processes (see :mod:`convnet.training.distributed`); 0 and 1 otherwise.
    """

    device: torch.device
    channels_last: bool = False
    autocast: torch.dtype | None = None
    infer_batch_size: int = 128
    graphs: bool = False
    fold_batchnorm: bool = False
    fuse_relu: bool = False
    rank: int = 0
    world_size: int = 1

    @classmethod
    def faithful(cls, device: torch.device | None = None) -> Engine:
        """The tutorial's arithmetic: fp32, NCHW, eager, predictions in batches of 128."""
        return cls(device or torch.device("cpu"))

    @classmethod
    def fast(cls, device: torch.device | None = None, precision: str = "auto") -> Engine:
        """The measured fast path for ``device`` (see ``convnet bench``), training in
        ``precision`` (``auto``: bf16 on a GPU and where the CPU computes it natively)."""
        device = device or torch.device("cpu")
        if precision != "auto":
            bf16 = torch.bfloat16 if precision == "bf16" else None
            return replace(cls.fast(device), autocast=bf16)
        if device.type == "cuda":
            # Measured on one H100 (docs/gpu.md): eager channels_last + bf16 is slower than plain fp32 (the
            # seed model at batch 128 is bound by kernel launches); inside a CUDA graph it is the fastest.
            return cls(device, channels_last=True, autocast=torch.bfloat16, infer_batch_size=1024, graphs=True)
        # Measured on 2 cores with AVX512-BF16, seed model, batch 128: channels_last 1.14x, bf16
        # autocast 1.6x, both 2.1x over plain fp32; torch.compile was slower. Without native bf16
        # instructions autocast emulates it slowly, so it is used only where the CPU has them.
        # Predicting is fp32 and fastest in batches of 512 (10,000 images, median of 5; images/s at 128 and 512):
        # on 2 AVX2 cores seed 7,616 and 8,914, fastnet-lean with test-time flips 4,177 and 4,686, fastnet 7,181 and
        # 7,163; on 2 Zen 4 cores seed 9,256 and 11,610 (docs/performance.md). Folding batch norm into the
        # convolutions: fastnet predicts 1.16x as fast on 2 AVX2 cores (median of 11). On 2 AMX cores 512 images
        # made activations of over 32 MB, which the C library maps afresh at every batch: 128 predicts the seed model
        # 1.7x and fastnet 1.5x as fast there; each ReLU fused into its convolution adds 1.2x for the seed model.
        return cls(device, channels_last=True, autocast=torch.bfloat16 if cpu_has_bf16() else None,
                   infer_batch_size=128 if cpu_has_amx() else 512, fold_batchnorm=True, fuse_relu=True)

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
        """The forward pass's autocast context (a no-op in fp32). Its weight cache is off:
        a CUDA graph must not keep casts made during its capture."""
        if self.autocast is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=not self.graphs):
                yield

    def describe(self) -> dict[str, object]:
        return {
            "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
            "channels_last": self.channels_last,
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None,
            "inference": "fp32",
            "infer_batch_size": self.infer_batch_size,
            "cuda_graphs": self.graphs,
            "fold_batchnorm": self.fold_batchnorm,
            "fuse_relu": self.fuse_relu,
            "torch_threads": torch.get_num_threads(),
            "processes": self.world_size,
            **({"cpu": {**cpu_info(), "bf16": cpu_has_bf16()}} if self.device.type == "cpu" else {}),
        }

    @property
    def recipe_kind(self) -> str:
        """What picks a run's default recipe (:data:`convnet.training.recipes.DEFAULT_RECIPE`):
        ``cuda``; ``cpu``, a CPU that trains in bfloat16; ``cpu-fp32``, one that trains in fp32
        (no native bfloat16, or ``--precision fp32``)."""
        if self.device.type != "cpu":
            return self.device.type
        return "cpu" if self.autocast is not None else "cpu-fp32"

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes files (rank 0)."""
        return self.rank == 0


@contextlib.contextmanager
def exact_arithmetic(device: torch.device) -> Iterator[None]:
    """Plain fp32 for a forward pass that predicts: no autocast and, on a GPU, no TF32
    (cuDNN's convolutions and cuBLAS's matrix products use TF32 by default where allowed,
    10 bits of mantissa). Every way of predicting goes through it, so a run answers the
    same on any CPU or GPU as in ONNX Runtime, within :data:`convnet.use.export`'s bound."""
    if device.type != "cuda":
        with torch.autocast("cpu", enabled=False):
            yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def make_engine(device: str | torch.device = "auto", *, faithful: bool = False, precision: str = "auto") -> Engine:
    """The engine every command uses: the tutorial's arithmetic for a faithful run, else
    the fast path, on ``device`` (``auto``, ``cpu``, ``cuda``, or a device), training in
    ``precision`` (``auto``, ``fp32``, ``bf16``; see :meth:`Engine.fast`)."""
    d = resolve_device(device)
    return Engine.faithful(d) if faithful else Engine.fast(d, precision)


def recipe_kind(device: torch.device, precision: str = "auto") -> str:
    """:attr:`Engine.recipe_kind` of the fast engine ``device`` and ``precision`` make."""
    return Engine.fast(device, precision).recipe_kind


def single_process(engine: Engine) -> Engine:
    """``engine`` for work one process does alone (the final evaluation)."""
    return replace(engine, rank=0, world_size=1)


class StepRunner:
    """Runs a training step ``fn(**tensors) -> loss``: eagerly, or as a CUDA graph.

    With ``engine.graphs`` the first ``warmup`` steps run eagerly on a side stream (they
    initialise the optimizer's state and the libraries' handles); the next step of the
    same batch size is captured in a CUDA graph, and every later one copies its tensors
    into the graph's inputs and replays it: a few launches per step instead of hundreds,
    and no synchronisation with the host. A step of another batch size (the ragged last
    batch) runs eagerly, through the same function. Where capture fails, every step runs
    eagerly from then on, and :attr:`note` says why.

    ``fn`` must be graph-safe: no host synchronisation, no Python decisions on tensor
    values, its state updated in place (the optimizer's learning rate a device tensor).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], engine: Engine, warmup: int = 3) -> None:
        self.fn, self.engine, self.warmup = fn, engine, warmup
        self.use_graph = engine.graphs and engine.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None
        self.size = -1
        self.eager_steps = 0
        self.note = ""

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        size = int(tensors["labels"].shape[0])
        if not self.use_graph:
            return self.fn(**tensors)
        if self.graph is not None:
            if size != self.size:  # the ragged last batch
                return self.fn(**tensors)
            for k, v in tensors.items():
                self.static[k].copy_(v, non_blocking=True)
            self.graph.replay()
            assert self.out is not None
            return self.out.clone()
        if self.size == -1:
            self.size = size  # the first batch's size is the one captured
        if size != self.size or self.eager_steps < self.warmup:
            self.eager_steps += size == self.size
            current = torch.cuda.current_stream(self.engine.device)
            side = torch.cuda.Stream(self.engine.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                loss = self.fn(**tensors)
            current.wait_stream(side)
            return loss
        return self._capture(tensors)

    def _capture(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.static = {k: v.clone() for k, v in tensors.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.engine.device)
            with torch.cuda.graph(graph):
                out = self.fn(**self.static)
        except Exception as e:  # noqa: BLE001 (any failure to capture: fall back to eager steps)
            self.use_graph = False
            self.note = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); " \
                        "training continues eagerly"
            print(f"convnet: {self.note}", file=sys.stderr)
            torch.cuda.synchronize(self.engine.device)
            return self.fn(**tensors)
        self.graph, self.out, self.size = graph, out, int(tensors["labels"].shape[0])
        graph.replay()  # capture records the step without running it: run it now
        return out.clone()
