"""Checkpoints: the state to resume a run from.

A checkpoint is one safetensors file: every tensor (weights, the moving average, the
optimizer's state, the random generators' states) as a tensor, everything else (epoch,
history, optimizer scalars) as JSON in its metadata. Nothing in it can run code.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.core import runfolder
from convnet.core.errors import RunError
from convnet.training.config import EpochRecord
from convnet.training.state import Best, TrainState


def save_checkpoint(path: Path, state: TrainState) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    if state.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in state.ema.module.state_dict().items()})
        tensors["ema_updates"] = state.ema.updates
    if state.align is not None:
        tensors["align.running"] = state.align
    if state.adaptive is not None:
        tensors["adaptive.running"] = state.adaptive
    opt = state.optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                opt_scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()} for g in opt["param_groups"]]
    if state.best is not None:  # the best epoch's weights: what the run keeps if no later epoch beats them
        tensors.update({f"best.{k}": v for k, v in state.best.weights.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = state.shuffle_rng.get_state()
    tensors["rng.augment"] = state.augment_rng.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    meta = {
        "epoch": state.epoch,
        "history": [asdict(r) for r in state.history],
        "optimizer_scalars": opt_scalars,
        "param_groups": groups,
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "rng_python": random.getstate(),
        "best": state.best.to_json() if state.best is not None else None,
        "peak": state.peak.to_json() if state.peak is not None else None,
    }
    runfolder.save_tensors(path, tensors, {"convnet": json.dumps(meta)})


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore ``state`` (model, optimizer, random states, epoch, history) in place.

    Raises:
        RunError: the file is not a convnet checkpoint or does not fit the model.
    """
    tensors = runfolder.load_tensors(path)
    meta = json.loads(runfolder.tensors_metadata(path).get("convnet", "{}"))
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = state.model.state_dict()
    if set(model_state) != set(own) or any(own[k].shape != v.shape for k, v in model_state.items()):
        raise RunError(f"{path}: the checkpoint's weights do not fit model {state.config.model!r}")
    try:
        state.model.load_state_dict(model_state)
        if state.ema is not None:
            state.ema.module.load_state_dict({k.removeprefix("ema."): v for k, v in tensors.items()
                                              if k.startswith("ema.")})
            state.ema.updates.copy_(tensors["ema_updates"])
        if state.align is not None and "align.running" in tensors:  # in place: the step holds this tensor
            state.align.copy_(tensors["align.running"])
        if state.adaptive is not None and "adaptive.running" in tensors:
            state.adaptive.copy_(tensors["adaptive.running"])
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = v
        for pid, scalars in meta["optimizer_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(scalars)
        groups = []
        for saved, fresh in zip(meta["param_groups"], state.optimizer.state_dict()["param_groups"], strict=True):
            # keep a tensor learning rate a tensor (faithful mode; CUDA graphs), on its device, with the saved value
            groups.append({k: torch.tensor(saved[k], dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor)
                           else saved.get(k, v) for k, v in fresh.items()})
        state.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        state.shuffle_rng.set_state(tensors["rng.shuffle"])
        state.augment_rng.set_state(tensors["rng.augment"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        kind, pos, has_gauss, cached = meta["rng_numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        state.epoch = int(meta["epoch"])
        state.history = [EpochRecord(**r) for r in meta["history"]]
        if meta.get("best") is not None:  # a checkpoint written before there were best epochs has none
            b = meta["best"]
            state.best = Best(int(b["epoch"]), float(b["val_accuracy"]), float(b["val_loss"]),
                              {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")})
            p = meta.get("peak") or b
            state.peak = Best(int(p["epoch"]), float(p["val_accuracy"]), float(p["val_loss"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise RunError(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                       "start the run again") from None
