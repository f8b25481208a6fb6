"""Reports: a run's plots in its folder, one self-contained HTML page for one or more
runs, and the same comparison as a table in the terminal.

::

    runs/NAME/plots/       written by `convnet evaluate` (or `convnet report` when missing)
      history.png          loss and accuracy per epoch
      confusion_matrix.png counts, rows true class, columns predicted class
      class_scores.png     precision, recall, f1 per class
      mistakes.png         the most confidently wrong test images
      samples.png          the first test images and their predictions

The HTML page embeds every image as base64 and needs nothing else to be read: no network,
no files beside it. matplotlib (in :mod:`convnet.trust.plots`) is imported only when a picture
is drawn, so the other commands do not pay for it.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.durable import atomic_write
from convnet.core.errors import ConvnetError, RunError
from convnet.core.htmlparts import CSS, SCRIPT, Raw, img, table
from convnet.data.dataset import Images
from convnet.trust.evaluation import Evaluation
from convnet.trust.inspection import inspection_html
from convnet.trust.scoring import evaluate_model, score_run
from convnet.use.explain import explained
from convnet.use.loadrun import LoadedRun, load_run

PLOT_FILES = ("history", "confusion_matrix", "class_scores", "mistakes", "samples")
GRID_IMAGES = 18  # images in the mistakes and samples grids (3 rows of 6)
AVERAGES = ("macro avg", "weighted avg")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RunSummary:
    """A run folder read back for reporting: its config, history and scores."""

    name: str
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, Any]  # metrics.json

    @property
    def classes(self) -> list[str]:
        return list(self.metrics["classes"])

    @property
    def report(self) -> dict[str, Any]:
        return self.metrics["test"]["report"]  # type: ignore[no-any-return]

    @property
    def train_accuracy(self) -> float | None:
        value = self.metrics["train"]["accuracy"]
        return None if value is None else float(value)  # None: a run that keeps no training images

    @property
    def test_accuracy(self) -> float:
        return float(self.metrics["test"]["accuracy"])

    @property
    def training_seconds(self) -> float:
        return float(sum(h.get("seconds") or 0.0 for h in self.history))

    def plot(self, name: str) -> Path:
        return runfolder.plot_path(self.path, name)


# --- plots in the run folder


def write_plots(run_dir: PathLike | runfolder.Run, evaluation: Evaluation, test_images: Images,
                model: nn.Module | None = None) -> dict[str, Path]:
    """Draw a run's pictures into ``RUN/plots/`` (each file written atomically).

    Args:
        run_dir: the run folder (its history is read from it), or the run already read.
        evaluation: the run's scores, with test predictions and probabilities.
        test_images: the test split's uint8 images ``(N, C, H, W)``, in the order scored
            (in memory or on disk: only the pictured ones are read).
        model: the run's model: the mistakes are drawn with the heat map of the class it
            gave them (:mod:`convnet.use.explain`); without it, as they are.

    Returns:
        The path of each picture, by name (see :data:`PLOT_FILES`).
    """
    from convnet.trust import plots  # imported here: matplotlib only when drawing

    run = run_dir if isinstance(run_dir, runfolder.Run) else runfolder.open_run(run_dir)
    folder = runfolder.plots_dir(run.path)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise RunError(f"{folder}: cannot create the plots folder ({e.strerror or e})") from None
    classes, title = evaluation.classes, run.path.name
    probs = evaluation.test.probabilities.detach().cpu().float().numpy()  # (N, C)
    labels = evaluation.test_labels.cpu().numpy()
    predicted = evaluation.test.predictions.cpu().numpy()

    def save(name: str, fig: Any) -> None:
        runfolder.write_plot(run.path, name, plots.save(fig))

    def grid(idx: np.ndarray, heading: str, explain: bool = False) -> Any:
        images = test_images[torch.from_numpy(idx)].cpu() if len(idx) else torch.zeros((0, 1, 1, 1), dtype=torch.uint8)
        pictures = explained(model, images, predicted[idx]) if explain and model is not None else images.numpy()
        return plots.plot_image_grid(pictures, labels[idx], predicted[idx], probs[idx, predicted[idx]],
                                     classes, heading)

    save("history", plots.plot_history(run.history, title))
    save("confusion_matrix", plots.plot_confusion(evaluation.confusion_matrix, classes, title))
    save("class_scores", plots.plot_class_scores(evaluation.report, classes, title))
    mistakes, n_wrong = plots.top_mistakes(probs, labels, GRID_IMAGES), int((predicted != labels).sum())
    why = " (heat map: the evidence for the class given, integrated gradients)" if model is not None else ""
    save("mistakes", grid(mistakes, f"The {len(mistakes)} most confidently wrong of {n_wrong:,} mistakes on "
                                    f"{len(labels):,} test images{why}: {title}" if n_wrong
                          else f"No mistakes: {title}", explain=True))
    first = np.arange(min(GRID_IMAGES, len(labels)))
    save("samples", grid(first, f"Predictions on the first {len(first)} test images: {title}"))
    return {name: runfolder.plot_path(run.path, name) for name in PLOT_FILES}


def evaluate_and_plot(path: PathLike, *, data_dir: PathLike | None = None, data: PathLike | None = None,
                      device: str = "auto", progress: bool = True) -> tuple[Evaluation, Path | None]:
    """What ``convnet evaluate PATH`` does: score a run folder with its own engine (writing
    ``metrics.json``) and draw its pictures into ``RUN/plots/``, or score an ``.onnx``
    file in ONNX Runtime (no pictures: it has no run folder); with ``data``, score either
    on that labelled folder instead, leaving the run's own scores and pictures as they are.

    Returns:
        The scores and the folder of the pictures (None for an ``.onnx`` file or ``data``).
    """
    evaluation, model, dataset = evaluate_model(path, data_dir=data_dir, data=data, device=device,
                                                progress=progress)
    if not isinstance(model, LoadedRun) or data is not None:
        return evaluation, None
    write_plots(model.run, evaluation, dataset.test.images, model.model)
    return evaluation, runfolder.plots_dir(model.path)


def _outdated(path: Path, plots: bool) -> bool:
    """True when the run has no scores, older scores than weights, or (``plots``) missing
    or older pictures."""
    metrics, weights = path / runfolder.METRICS, path / runfolder.WEIGHTS
    if not metrics.is_file():
        return True
    scored = metrics.stat().st_mtime
    if weights.is_file() and weights.stat().st_mtime > scored:
        return True
    pictures = [runfolder.plot_path(path, name) for name in PLOT_FILES]
    return plots and any(not p.is_file() or p.stat().st_mtime < scored for p in pictures)


def load_summary(run_dir: PathLike, *, name: str | None = None, plots: bool = True,
                 data_dir: PathLike | None = None, device: str = "auto") -> RunSummary:
    """Read a run for reporting, evaluating it first (and drawing its pictures when
    ``plots``) if its scores are missing or older than its weights.

    Raises:
        RunError: not a run folder, or its files are missing or damaged.
    """
    run = runfolder.open_run(run_dir)
    if _outdated(run.path, plots):
        loaded = load_run(run, device=device)
        dataset = loaded.dataset(data_dir)
        evaluation = score_run(loaded, dataset)
        if plots:
            write_plots(run, evaluation, dataset.test.images, loaded.model)
    metrics = runfolder.read_json(run.path / runfolder.METRICS)
    try:
        classes = metrics["classes"]
        _ = [metrics["test"]["report"][c]["f1-score"] for c in classes], metrics["train"]["accuracy"]
    except (KeyError, TypeError):
        raise RunError(f"{run.path / runfolder.METRICS}: incomplete; run `convnet evaluate {run.path}` again") from None
    return RunSummary(name or run.path.name, run.path, run.config, run.history, metrics)


def load_summaries(run_dirs: Sequence[PathLike], *, plots: bool = True, data_dir: PathLike | None = None,
                   device: str = "auto") -> list[RunSummary]:
    """:func:`load_summary` for each run, named by folder (by path where two folders share a name)."""
    if not run_dirs:
        raise ConvnetError("give at least one run folder")
    names = [Path(p).name for p in run_dirs]
    names = [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names, strict=True)]
    summaries = [load_summary(p, name=n, plots=plots, data_dir=data_dir, device=device)
                 for p, n in zip(run_dirs, names, strict=True)]
    if len({tuple(s.classes) for s in summaries}) > 1:
        raise RunError("the runs were trained on different classes; compare runs of one data set")
    return summaries


# --- the comparison in the terminal


@dataclass(frozen=True)
class Comparison:
    """Runs side by side, as both the terminal and the HTML page show them.

    Attributes:
        names: the runs, in order.
        rows: ``(label, one cell per run)``: settings, sizes, times and scores.
        classes: the test classes, then the averages (macro, weighted).
        f1: one row per entry of ``classes``: each run's f1.
    """

    names: list[str]
    rows: list[tuple[str, list[str]]]
    classes: list[str]
    f1: list[list[float]]

    @property
    def deltas(self) -> list[str]:
        """The headers of the differences from the first run."""
        return [f"{n}-{self.names[0]}" for n in self.names[1:]]

    def to_json(self) -> dict[str, Any]:
        rows = {label: dict(zip(self.names, cells, strict=True)) for label, cells in self.rows}
        f1 = {c: dict(zip(self.names, row, strict=True)) for c, row in zip(self.classes, self.f1, strict=True)}
        return {"runs": self.names, **rows, "f1": f1}


def comparison(summaries: Sequence[RunSummary]) -> Comparison:
    """The one comparison of runs: their settings, sizes, times and accuracies, and the
    f1 of each class."""
    s = summaries
    rows = [(label, [str(r.config["train"].get(key, "")) for r in s])
            for label, key in (("model", "model"), ("optimizer", "optimizer"), ("lr", "lr"), ("epochs", "epochs"),
                               ("batch size", "batch_size"), ("seed", "seed"))]
    rows += [
        ("train images", [f"{r.config['data'].get('train_images') or 0:,}" for r in s]),
        ("val images", [f"{r.config['data'].get('val_images') or 0:,}" for r in s]),
        ("kept epoch", [kept_epoch(r.config) for r in s]),
        ("training s", [f"{r.training_seconds:.1f}" for r in s]),
        ("final loss", [f"{r.history[-1]['loss']:.3f}" if r.history else "-" for r in s]),
        ("train accuracy", [_accuracy(r.train_accuracy) for r in s]),
        ("test accuracy", [f"{r.test_accuracy:.3f}" for r in s]),
    ]
    classes = [*s[0].classes, *AVERAGES]
    return Comparison([r.name for r in s], rows, classes, [[r.report[c]["f1-score"] for r in s] for c in classes])


def kept_epoch(config: dict[str, Any]) -> str:
    """Which epoch's weights a run keeps: ``"7/24 best"`` (the best on validation), ``"24/24"``, or ``"-"``."""
    kept, epochs = config.get("kept"), config.get("train", {}).get("epochs")
    if not isinstance(kept, dict) or "epoch" not in kept:
        return "-"
    return f"{kept['epoch']}/{epochs}" + (" best" if "val_accuracy" in kept else "")


def format_comparison(summaries: Sequence[RunSummary]) -> str:
    """Runs in columns: :func:`comparison`, the loss per epoch, and f1 per class with its
    difference from the first run."""
    table = comparison(summaries)
    names = table.names
    w = max(10, *(len(str(c)) + 2 for c in [*names, *(c for _, cells in table.rows for c in cells)]))  # a gap each
    dw = max([8, *(len(d) + 2 for d in table.deltas)])

    def row(label: str, cells: Sequence[str], extra: Sequence[str] = ()) -> str:
        return f"{label:<16}" + "".join(f"{c:>{w}}" for c in cells) + "".join(f"{c:>{dw}}" for c in extra)

    lines = [row("run", names), *(row(label, cells) for label, cells in table.rows)]
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss"), ("val_accuracy", "val accuracy")):
        curves = [[h.get(key) for h in s.history] for s in summaries]
        if not any(v is not None for c in curves for v in c):
            continue
        lines += ["", row(f"{label}", names)]
        for e in range(max(len(c) for c in curves)):
            lines.append(row(f"  epoch {e + 1}", [f"{c[e]:.3f}" if e < len(c) and c[e] is not None else "-"
                                                   for c in curves]))
    lines += ["", row("f1 per class", names, table.deltas)]
    for c, f1 in zip(table.classes, table.f1, strict=True):
        lines.append(row(c[:15], [f"{v:.3f}" for v in f1], [f"{v - f1[0]:+.3f}" for v in f1[1:]]))
    return "\n".join(lines)


def compare(run_dirs: Sequence[PathLike], *, data_dir: PathLike | None = None, device: str = "auto",
            as_json: bool = False) -> str:
    """What ``convnet compare RUN...`` prints: :func:`format_comparison` of the runs
    (evaluated first where they have no scores yet), or with ``as_json`` :func:`comparison`'s JSON."""
    summaries = load_summaries(run_dirs, plots=False, data_dir=data_dir, device=device)
    return json.dumps(comparison(summaries).to_json(), indent=2) if as_json else format_comparison(summaries)


# --- the HTML report



def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, list) else str(v)))
    return out


def _comparison_html(summaries: Sequence[RunSummary]) -> str:
    from convnet.trust import plots  # imported here: matplotlib only when drawing

    found = comparison(summaries)
    names, classes = found.names, summaries[0].classes

    def delta(v: float) -> Raw:
        cls = "better" if v > 0.0005 else "worse" if v < -0.0005 else ""
        return Raw(f'<td class="{cls}">{v:+.3f}</td>')

    f1_rows = [[c, *(f"{v:.3f}" for v in f1), *(delta(v - f1[0]) for v in f1[1:])]
               for c, f1 in zip(found.classes, found.f1, strict=True)]
    return "".join([
        '<h2>Comparison</h2><div class="row"><div>',
        table(["", *names], [[label, *cells] for label, cells in found.rows]),
        "</div>",
        img(plots.save(plots.plot_accuracies(names, [math.nan if s.train_accuracy is None else s.train_accuracy
                                                      for s in summaries],
                                              [s.test_accuracy for s in summaries])), "accuracy of each run"),
        "</div>",
        img(plots.save(plots.plot_histories([s.history for s in summaries], names)), "loss curves overlaid"),
        "<h3>f1 per class (test set)</h3>",
        '<div class="row"><div>',
        table(["class", *names, *(f"{n} − {names[0]}" for n in names[1:])], f1_rows),
        "</div>",
        img(plots.save(plots.plot_f1_differences([s.report for s in summaries], names, classes)),
             "per-class f1 differences"),
        "</div>",
    ])


def _kept_html(config: dict[str, Any]) -> str:
    kept = config.get("kept")
    if not isinstance(kept, dict) or "val_accuracy" not in kept:
        return ""
    return (f"<p>Weights kept: epoch {kept['epoch']} of {config['train'].get('epochs')}, the best on the "
            f"{config['data'].get('val_images', 0):,} validation images (accuracy {kept['val_accuracy']:.4f}, "
            f"loss {kept['val_loss']:.4f}).</p>")


def _pool_cell(h: dict[str, Any]) -> str:
    """An epoch's share of the unlabelled images the teacher was sure of, and its mean confidence on them."""
    if h.get("pool_used") is None:
        return "-"
    return f"{h['pool_used']:.0%}" + (f" ({h['pool_confidence']:.2f})" if h["pool_used"] else "")


def _run_html(s: RunSummary, anchor: str) -> str:
    e = html.escape
    report_rows = [[c, *(f"{s.report[c][k]:.3f}" for k in ("precision", "recall", "f1-score")),
                    int(s.report[c]["support"])] for c in [*s.classes, *AVERAGES]]
    pooled = any(h.get("pool_used") is not None for h in s.history)  # trained with unlabelled images too
    history_rows = [[h.get("epoch", i + 1), f"{h['loss']:.4f}",
                     *(f"{h[k]:.4f}" if h.get(k) is not None else "-" for k in ("val_loss", "val_accuracy")),
                     *([_pool_cell(h)] if pooled else []),
                     f"{h.get('seconds', 0):.1f}", f"{h.get('images_per_s', 0):,.0f}"]
                    for i, h in enumerate(s.history)]
    history_head = ["epoch", "loss", "val loss", "val accuracy", *(["pool used (confidence)"] if pooled else []),
                    "seconds", "images/s"]
    pictures = {"history": "loss and accuracy per epoch", "confusion_matrix": "confusion matrix",
                "class_scores": "precision, recall and f1 per class", "mistakes": "most confidently wrong",
                "samples": "sample predictions"}
    images = {k: img(s.plot(k).read_bytes(), alt) for k, alt in pictures.items()}
    return "".join([
        f'<section id="{anchor}"><h2>Run {e(s.name)}</h2><p class="muted">{e(str(s.path))}</p>',
        table(["", "train", "test"], [["accuracy", _accuracy(s.train_accuracy), f"{s.test_accuracy:.3f}"]]),
        _kept_html(s.config),
        images["history"],
        '<div class="row"><div><h3>Classification report (test set)</h3>',
        table(["class", "precision", "recall", "f1-score", "support"], report_rows),
        "</div>", images["class_scores"], "</div>",
        images["confusion_matrix"], images["mistakes"], images["samples"],
        inspection_html(s.path),
        f"<h3>Epochs ({s.training_seconds:.1f} s of training)</h3>",
        table(history_head, history_rows),
        "<h3>Config</h3>",
        table(["key", "value"], _flat(s.config), cls="kv"),
        "</section>",
    ])


def render_html(summaries: Sequence[RunSummary]) -> str:
    """The report page: with several runs a comparison first, then each run in full."""
    e = html.escape
    title = "convnet report: " + " vs ".join(s.name for s in summaries)
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>',
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>{e(title)}</h1><p class='muted'>written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}; "
        f"{len(summaries)} run{'s' if len(summaries) > 1 else ''}: "
        + ", ".join(f'<a href="#run-{i}">{e(s.name)}</a>' for i, s in enumerate(summaries, 1)) + "</p>",
    ]
    if len(summaries) > 1:
        parts.append(_comparison_html(summaries))
    parts += [_run_html(s, f"run-{i}") for i, s in enumerate(summaries, 1)]
    parts.append("</body></html>\n")
    return "".join(parts)


def build_report(run_dirs: Sequence[PathLike], out: PathLike | None = None, *, data_dir: PathLike | None = None,
                 device: str = "auto") -> Path:
    """Write one self-contained HTML report of the runs (evaluating and drawing any run
    whose scores or pictures are missing or out of date).

    Args:
        run_dirs: run folders; with several, the page opens with their comparison.
        out: the HTML file, or a folder for ``report.html``; default ``report.html`` in the
            runs' common folder (the run folder itself for one run).
        data_dir: where to find the data set, if a run needs evaluating.
        device: where to compute that evaluation (``auto``, ``cpu``, ``cuda``).

    Returns:
        The report's path.
    """
    summaries = load_summaries(run_dirs, data_dir=data_dir, device=device)
    if out is None:
        path = Path(os.path.commonpath([os.path.abspath(p) for p in run_dirs])) / "report.html"
    else:
        path = Path(out) / "report.html" if Path(out).is_dir() else Path(out)
    if not path.parent.is_dir():
        raise RunError(f"-o/--out {path}: folder {path.parent} does not exist")
    page = render_html(summaries).encode()
    atomic_write(path, lambda f: f.write(page))
    return path
