"""Which images to label next: ``convnet suggest RUN POOL``, a trained run's ranking of
unlabelled images by how much their labels would help.

Each pool image is predicted by the run's model; the ranking (:func:`rank`) starts from
the images it is least sure of (the smallest margin between its two most probable
classes) and spreads the picks over the data: BADGE's choice (Ash et al., 2020), k-means++
seeding on each image's gradient embedding, the penultimate features scaled by how far the
prediction is from sure, so that fifty copies of one confusing picture count as one. Judged
against the margin alone on validation images (``benchmarks/suggest_sim.py --score judge``,
three seeds): level on their mean, BADGE ahead on two of them, so BADGE stays for its
spread (docs/small-data.md).

The run's own labelled images, training, validation and test (the same file bytes, or the
same pixels once converted to the run's input), are never suggested: a test image labelled
and moved into training would flatter every score after. A pool is a folder of images (any layout, as ``convnet
predict DIR`` reads it), or ``rest``: the training images of the run's data that it did
not train on (``--subset``); on a named data set those are given by their index.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convnet.core import htmlparts
from convnet.core.durable import atomic_write, check_output_file
from convnet.core.errors import ConvnetError
from convnet.data.dataset import Images, pixel_digests
from convnet.data.folders import load_pool
from convnet.data.load import run_data
from convnet.data.options import REST
from convnet.models.engine import exact_arithmetic
from convnet.models.networks import head_name
from convnet.use.loadrun import LoadedRun, load_run
from convnet.use.onnxfile import is_onnx

CANDIDATES = 10  # the least sure images the spread is chosen among, per image asked for
METHODS = ("badge", "margin", "random")


@dataclass(frozen=True)
class Suggestion:
    """One image to label: its place in the ranking, where it is, the model's guess."""

    rank: int
    item: str  # a file of the pool folder, or the index of a training image of a named data set
    predicted: str
    probability: float
    score: float  # how unsure the model is: 1 - (top probability - second), 1 the least sure

    def to_json(self) -> dict[str, object]:
        return {"rank": self.rank, "item": self.item, "predicted": self.predicted,
                "probability": self.probability, "score": self.score}


def predict_with_features(loaded: LoadedRun, images: Images, batch_size: int = 512) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """The class probabilities ``(N, K)`` the run answers with, and the penultimate features
    ``(N, D)`` its head sees (the input of its last linear layer), batch by batch."""
    model = loaded.model
    head = model.get_submodule(("model." if hasattr(model, "temperature") else "") + head_name(model))
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().float().cpu()))
    probs, feats = [], []
    engine = loaded.engine
    try:
        with torch.inference_mode(), exact_arithmetic(engine.device):
            model.eval()
            for start in range(0, len(images), batch_size):
                x = engine.batch(images[start:start + batch_size])
                seen.clear()
                logits = model(x).float()
                if loaded.tta:
                    logits = (logits + model(x.flip(3)).float()) / 2
                probs.append(logits.softmax(1).cpu())
                feats.append(seen[0].flatten(1))
    finally:
        hook.remove()
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def rank(probs: np.ndarray, features: np.ndarray, n: int, *, method: str = "badge", seed: int = 0) -> np.ndarray:
    """The rows of the ``n`` images whose labels would help most, best first.

    Args:
        probs: ``(N, K)`` class probabilities.
        features: ``(N, D)`` the penultimate features.
        method: ``badge`` (the least sure, spread over the data), ``margin`` (the least
            sure alone), or ``random`` (for comparison).
    """
    if method not in METHODS:
        raise ConvnetError(f"unknown ranking {method!r}; choose one of: {', '.join(METHODS)}")
    n = min(n, len(probs))
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.permutation(len(probs))[:n]
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # (N,): 0 where the model cannot choose between two classes
    order = np.argsort(margin, kind="stable")
    if method == "margin":
        return order[:n]
    pool = order[:max(n, CANDIDATES * n)]  # the least sure, the ones worth spreading the picks over
    onehot = np.zeros_like(probs[pool])
    onehot[np.arange(len(pool)), probs[pool].argmax(1)] = 1
    # BADGE's gradient embedding: the last layer's gradient for the predicted class, (N, K * D)
    g = ((probs[pool] - onehot)[:, :, None] * features[pool][:, None, :]).reshape(len(pool), -1)
    chosen = [int(np.argmax((g * g).sum(1)))]  # k-means++: the largest gradient first, then far from the chosen
    dist = ((g - g[chosen[0]]) ** 2).sum(1)
    while len(chosen) < n:
        if dist.sum() <= 0:
            chosen += [i for i in range(len(pool)) if i not in set(chosen)][:n - len(chosen)]
            break
        nxt = int(rng.choice(len(pool), p=dist / dist.sum()))
        chosen.append(nxt)
        dist = np.minimum(dist, ((g - g[nxt]) ** 2).sum(1))
    return pool[np.array(chosen)]


def _file_digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


@dataclass
class SuggestResult:
    """What ``convnet suggest`` found: the ranking, how many pool images it ranked and how
    many it left out because they are the run's own labelled images (training, validation or test)."""

    suggestions: list[Suggestion]
    ranked: int
    already_labelled: int
    html: Path | None = None


def suggest(run: str | os.PathLike[str], pool: str | os.PathLike[str], *, n: int = 100, device: str = "auto",
            method: str = "badge", csv_out: str | os.PathLike[str] | None = None,
            html_out: str | os.PathLike[str] | None = None, progress: bool = True,
            data_dir: str | os.PathLike[str] | None = None) -> SuggestResult:
    """What ``convnet suggest RUN POOL`` does (see the module's docstring).

    Args:
        run: a run folder (its model, in PyTorch: the ranking needs its features).
        pool: a folder of unlabelled images, or ``rest``.
        n: how many to suggest.
        csv_out: also write the ranking as a table: ``path,predicted,probability,score``
            (``index,...`` for a named data set's images), best first.
        html_out: also write a contact sheet of the suggested images, with the model's guess.
        data_dir: where the run's own data is now, if it moved.

    Raises:
        ConvnetError: a bad ``n``, an ``.onnx`` file, a pool that is not a folder of images,
            an output that cannot be written, or a pool with nothing left to suggest.
    """
    if n < 1:
        raise ConvnetError(f"--n must be at least 1, got {n}")
    if is_onnx(run):
        raise ConvnetError(f"{run}: an .onnx file keeps no features to spread the suggestions by; give the run "
                           "folder it was exported from")
    if str(pool) != REST and not Path(pool).is_dir():
        raise ConvnetError(f"{pool}: no such folder; give a folder of unlabelled images, or rest (the training "
                           "images the run did not train on)")
    for flag, out in (("--csv", csv_out), ("--html", html_out)):
        if out is not None:
            check_output_file(Path(out), flag)
    loaded = load_run(run, device=device)
    trained = run_data(loaded.run, data_dir, progress=progress, pool=str(pool) == REST)
    labelled = [trained.train, trained.test] + ([trained.val] if trained.val is not None else [])
    seen_pixels = {d for split in labelled for d in pixel_digests(split.images)}  # none of them is suggested
    already = 0
    if str(pool) == REST:
        if trained.pool is None:
            raise ConvnetError(f"{loaded.path} trained on all of its training images (no --subset): rest holds none "
                               "to suggest; give a folder of unlabelled images")
        images = trained.pool
        items = trained.files["pool"] if trained.files is not None and "pool" in trained.files else \
            [str(i) for i in (trained.pool_index if trained.pool_index is not None else [])]
    else:
        images, _, _, items = load_pool(pool, loaded.spec, progress=progress)
        if trained.files is not None:  # a folder run: its labelled files, by their bytes
            root, source = Path(pool).resolve(), Path(loaded.run.config["data"]["source"])
            trained_bytes = {_file_digest(source / f) for side in ("train", "val", "test")
                             for f in trained.files.get(side, []) if (source / f).is_file()}
            keep = [i for i, f in enumerate(items) if _file_digest(root / f) not in trained_bytes]
            already = len(items) - len(keep)
            images, items = images[torch.tensor(keep, dtype=torch.long)], [items[i] for i in keep]
    whole = images if isinstance(images, torch.Tensor) else images[np.arange(len(images))]
    fresh = np.array([d not in seen_pixels for d in pixel_digests(whole)], dtype=bool)  # the same pixels: left out too
    already += int((~fresh).sum())
    rows = np.flatnonzero(fresh)
    if len(rows) == 0:
        raise ConvnetError(f"{pool}: every image in it is one of the run's own labelled images; nothing to suggest")
    candidates = whole[torch.from_numpy(rows)]
    probs, feats = predict_with_features(loaded, candidates)
    order = rank(probs, feats, n, method=method)
    top2 = np.sort(probs, axis=1)[:, -2:]
    suggestions = [Suggestion(r + 1, str(items[rows[i]]), loaded.spec.classes[int(probs[i].argmax())],
                              round(float(probs[i].max()), 6), round(float(1 - (top2[i, 1] - top2[i, 0])), 6))
                   for r, i in enumerate(order)]
    if csv_out is not None:
        head = "index" if str(pool) == REST and (trained.files is None or "pool" not in trained.files) else "path"
        text = "".join([f"{head},predicted,probability,score\n", *(
            f"{_csv(s.item)},{_csv(s.predicted)},{s.probability:.6f},{s.score:.6f}\n" for s in suggestions)]).encode()
        atomic_write(Path(csv_out), lambda f: f.write(text))
    sheet = None
    if html_out is not None:
        sheet = Path(html_out)
        page = contact_sheet(suggestions, candidates[torch.from_numpy(order)].numpy(), loaded.path).encode()
        atomic_write(sheet, lambda f: f.write(page))
    return SuggestResult(suggestions, len(rows), already, sheet)


def _csv(value: str) -> str:
    """A CSV cell: quoted where it holds a comma, a quote or a line break."""
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def contact_sheet(suggestions: Sequence[Suggestion], images: np.ndarray, run: Path) -> str:
    """A self-contained HTML page: each suggested image, enlarged, with its rank, where it
    is, and the model's guess, in the order to label them."""
    import base64
    import io

    from PIL import Image

    cells = []
    for s, image in zip(suggestions, images, strict=True):
        a = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB").resize(
            (a.shape[1] * 4, a.shape[0] * 4), Image.NEAREST).save(buffer, "PNG")
        src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        cells.append(f'<figure><img src="{src}" alt="{html.escape(s.item)}"><figcaption>#{s.rank} '
                     f"{html.escape(s.item)}<br>looks like {html.escape(s.predicted)} {s.probability:.2f}"
                     "</figcaption></figure>")
    title = html.escape(f"convnet suggest: {len(suggestions)} images to label for {run.name}")
    style = (htmlparts.CSS + "figure{display:inline-block;margin:6px;text-align:center;font-size:12px;width:140px}"
             "img{image-rendering:pixelated;max-width:128px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{style}</style></head><body><h1>{title}</h1><p>Label them in this order: move each file "
            "into its class folder under the training folder, then train again. The order: the images the model is "
            "least sure of, spread over the data, so an image it is sure of may come early; a sure guess can still "
            "be wrong.</p>" + "".join(cells)
            + "</body></html>\n")

