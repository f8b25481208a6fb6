"""Which inference and training settings are fastest on this GPU? Times the tutorial's
MakePredictions against convnet's infer under each precision, memory format, batch size
and cuDNN autotuning setting, and one training epoch of the seed model (Adam, batch 128,
60,000 images) eagerly and as a CUDA graph. Prints images/s, best of 3 after a warm-up.

Usage: PYTHONPATH=src python3 benchmarks/gpu_probe.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch

from convnet.data.named import load_dataset
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.models.networks import create_model
from convnet.tools.bench import MakePredictions
from convnet.training.config import TrainConfig
from convnet.training.loop import train


def best_of(fn, n: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    device = torch.device("cuda")
    ds = load_dataset("fashion-mnist", sys.argv[1] if len(sys.argv) > 1 else None)
    test = ds.test.images.to(device)
    x_test = test.float() / 255
    torch.manual_seed(0)
    model = create_model("seed").to(device).eval()
    n = len(test)
    t = best_of(lambda: torch.cat(MakePredictions(model, x_test, batch_size=128)).argmax(1))
    print(f"predict  tutorial MakePredictions fp32 bs128: {n / t:>12,.0f} images/s", flush=True)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for cl in (False, True):
            for dtype in (None, torch.bfloat16):
                m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                for bs in (1024, 4096, 10_000):
                    engine = Engine(device, channels_last=cl, autocast=dtype, infer_batch_size=bs)
                    t = best_of(lambda engine=engine, m=m: infer(m, test, engine=engine).argmax(1))
                    print(f"predict  infer benchmark={bench} channels_last={cl} {dtype or 'fp32'} bs{bs}: "
                          f"{n / t:>12,.0f} images/s", flush=True)
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        config = TrainConfig(model="seed", optimizer="adam", lr=1e-3, epochs=1, batch_size=128)
        for name, engine in (("eager fp32", Engine(device)),
                             ("eager cl+bf16", Engine(device, channels_last=True, autocast=torch.bfloat16)),
                             ("graph fp32", Engine(device, graphs=True)),
                             ("graph cl+bf16", replace(Engine.fast(device)))):
            secs = [train(config, ds.train, ds.spec, engine=engine).seconds for _ in range(3)]
            print(f"train    seed adam bs128 60k benchmark={bench} {name}: {60_000 / min(secs):>12,.0f} images/s",
                  flush=True)


if __name__ == "__main__":
    main()
