"""Inspecting a run: when to trust it. Likely label errors, calibration, per-class scores.

:func:`inspect_run` is what ``convnet inspect RUN`` computes:

* **likely label errors**, ranked: on the test split from the run's own predictions; on
  the training split (``train_folds=K``) from out-of-fold probabilities, each image
  predicted by a model trained on the other K-1 folds (kept in the run folder, so a
  second inspection does not train again). Confident learning ranks them: cleanlab's
  ``find_label_issues`` (as many as it estimates, the lowest self-confidence first);
* **calibration** on the test split: the expected calibration error over
  :data:`ECE_BINS` equal-width confidence bins, with a bootstrap 95 % interval, and the
  bins behind a reliability diagram;
* **per class**: support, precision, recall, and the most confused pairs.

Probabilities come from the run's one inference path (:meth:`LoadedRun.probabilities`),
so they are those ``convnet predict RUN`` answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.core import runfolder
from convnet.core.durable import atomic_file, check_output_file
from convnet.core.errors import ConvnetError
from convnet.core.htmlparts import img, table
from convnet.data.dataset import Dataset, Split
from convnet.models.engine import single_process
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.events import fit_temperature
from convnet.training.run import train_run
from convnet.use.explain import explained
from convnet.use.loadrun import LoadedRun, load_run, run_temperature

PathLike = str | os.PathLike[str]
DIAGRAM = "reliability"  # the reliability diagram, among the run's pictures
EXPLAINED = "mistakes_explained"  # the most confidently wrong test images with their heat maps
FLAGGED = "label_issues"  # the most likely label errors
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
BOOTSTRAP = 1000  # resamples of the test images behind the ECE's 95 % interval
CONFUSED_PAIRS = 5  # the most confused (true, predicted) pairs shown


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label is likely wrong.

    Attributes:
        rank: 1 for the most likely error.
        split: ``train`` or ``test``.
        index: the image's row in its split.
        given, suggested: the label it has and the class the model gives it (indices).
        confidence: the probability of the suggested class.
        given_probability: the probability of the given class.
        path: the image file, for a run on a folder of images.
    """

    rank: int
    split: str
    index: int
    given: int
    suggested: int
    confidence: float
    given_probability: float
    path: str | None = None


@dataclass(frozen=True)
class Calibration:
    """How far the test split's confidences are from its accuracy.

    Attributes:
        ece: expected calibration error: the images' share-weighted mean of |accuracy -
            mean confidence| over :data:`ECE_BINS` equal-width bins of the top probability.
        low, high: its bootstrap 95 % interval (percentiles 2.5 and 97.5).
        bins: per bin, its lower and upper edge, images, mean confidence and accuracy.
    """

    ece: float
    low: float
    high: float
    bins: list[dict[str, float]]


@dataclass(frozen=True)
class ClassReport:
    name: str
    support: int
    precision: float
    recall: float


@dataclass(frozen=True)
class Inspection:
    """What ``convnet inspect RUN`` reports (see the module's docstring)."""

    run: Path
    classes: tuple[str, ...]
    test_images: int
    test_accuracy: float
    issues: list[LabelIssue]
    calibration: Calibration
    per_class: list[ClassReport]
    confused: list[tuple[str, str, int]]  # (true class, predicted class, test images), most first
    folds: dict[str, Any] | None = None  # how the out-of-fold probabilities were made (train_folds)
    temperature: float | None = None  # the run's calibration (None: none), in the probabilities above
    mistakes: dict[str, np.ndarray] | None = None  # the most confidently wrong test images, with heat maps (not JSON)
    flagged: np.ndarray | None = None  # the first :data:`SHOWN` likely label errors' images (not JSON)

    @property
    def warning(self) -> str | None:
        """Why the label errors found may mean little: a model too weak for them.

        Confident learning calls an image mislabelled where the model confidently disagrees
        with its label; that reads the model's mistakes as the labels' only where the model
        is mostly right. The line is drawn halfway between chance and every image right
        (0.55 for 10 classes, 0.75 for 2): below it the model is wrong on most of what it
        could get right, and most disagreements are its own mistakes."""
        line = (1 + 1 / len(self.classes)) / 2
        if self.test_accuracy >= line:
            return None
        return (f"the model's test accuracy {self.test_accuracy:.3f} is below {line:.2f} (halfway between chance and "
                "every image right): most of the likely label errors are its own mistakes; train a better model "
                "before trusting them")

    def to_json(self) -> dict[str, Any]:
        return {"run": str(self.run), "classes": list(self.classes), "test_images": self.test_images,
                "test_accuracy": self.test_accuracy,
                "label_issues": [{**asdict(i), "given_class": self.classes[i.given],
                                  "suggested_class": self.classes[i.suggested]} for i in self.issues],
                "calibration": asdict(self.calibration),
                "per_class": [asdict(c) for c in self.per_class],
                "confused": [{"true": t, "predicted": p, "images": n} for t, p, n in self.confused],
                "train_folds": self.folds, "temperature": self.temperature, "warning": self.warning}


# --- the numbers: pure functions of probabilities and labels


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The top probability's equal-width bins: edges, images, mean confidence, accuracy."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)  # [lo, hi); 1.0 in the last
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "images": n,
                    "confidence": float(confidence[inside].mean()) if n else float("nan"),
                    "accuracy": float(correct[inside].mean()) if n else float("nan")})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Guo et al. (2017): sum over bins of (images in bin / images) x |accuracy - confidence|."""
    table = calibration_bins(probs, labels, bins)
    n = max(len(labels), 1)
    return float(sum(b["images"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["images"]))


def calibration(probs: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS, resamples: int = BOOTSTRAP,
                seed: int = 0) -> Calibration:
    """The ECE with a bootstrap 95 % interval: the test images resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = [expected_calibration_error(probs[rows], labels[rows], bins)
             for rows in (rng.integers(0, n, n) for _ in range(resamples))] if n else [0.0]
    low, high = np.percentile(draws, [2.5, 97.5])
    return Calibration(expected_calibration_error(probs, labels, bins), float(low), float(high),
                       calibration_bins(probs, labels, bins))


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows whose label is likely wrong, most likely first: cleanlab's confident learning
    (``find_label_issues``): as many rows as confident learning estimates the labels hold
    errors, those whose given label has the lowest probability (``filter_by=
    "low_self_confidence"``), ranked by it. Chosen over cleanlab's default (prune by noise
    rate) on Fashion-MNIST with 3 % of 10,000 labels moved (``benchmarks/trust.py``,
    planting seed 2): precision 0.63 and recall 0.92 against 0.40 and 0.83."""
    from cleanlab.filter import find_label_issues as cleanlab_issues

    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return np.empty(0, dtype=np.int64)
    return np.asarray(cleanlab_issues(labels, probs, filter_by="low_self_confidence",
                                      return_indices_ranked_by="self_confidence"), dtype=np.int64)


def label_issues(probs: np.ndarray, labels: np.ndarray, split: str, files: list[str] | None = None
                 ) -> list[LabelIssue]:
    """The flagged rows of one split as :class:`LabelIssue` records, ranked."""
    rows = find_label_issues(probs, labels)
    return [LabelIssue(rank=r + 1, split=split, index=int(i), given=int(labels[i]), suggested=int(probs[i].argmax()),
                       confidence=round(float(probs[i].max()), 6),
                       given_probability=round(float(probs[i, labels[i]]), 6),
                       path=files[i] if files is not None else None) for r, i in enumerate(rows)]


def per_class(probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]
              ) -> tuple[list[ClassReport], list[tuple[str, str, int]]]:
    """Support, precision and recall per class, and the most confused (true, predicted) pairs."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(classes)
    predicted = probs.argmax(1)
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=range(k),
                                                                    zero_division=0)
    reports = [ClassReport(classes[c], int(support[c]), round(float(precision[c]), 4), round(float(recall[c]), 4))
               for c in range(k)]
    cm = confusion_matrix(labels, predicted, labels=range(k))
    np.fill_diagonal(cm, 0)
    order = np.argsort(-cm, axis=None, kind="stable")[:CONFUSED_PAIRS]
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i, j in zip(*np.unravel_index(order, cm.shape), strict=True)
             if cm[i, j] > 0]
    return reports, pairs


# --- out-of-fold probabilities on the training split


def fold_config(config: TrainConfig) -> TrainConfig:
    """The schedule each fold's model trains with: the run's own settings, half its epochs
    (at least 1), from fresh weights, without validation or a target accuracy."""
    epochs = max(1, round(config.epochs / 2))
    return replace(config, epochs=epochs, warmup_epochs=min(config.warmup_epochs, epochs), val_split=0.0,
                   target_accuracy=0.0, freeze_epochs=0, body_lr=1.0, calibrate=False)


def out_of_fold(loaded: LoadedRun, train_split: Split, folds: int, *, progress: bool = True
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Each training image's probabilities from a model trained on the other folds
    (stratified, shuffled with the run's seed), and how they were made. Kept in
    ``RUN/inspect/`` under a key of the folds, the settings and the labels, and read back
    instead of training again."""
    from sklearn.model_selection import StratifiedKFold

    config = fold_config(loaded.train_config)
    labels = train_split.labels.cpu().numpy()
    key = hashlib.sha256(json.dumps({"folds": folds, "config": asdict(config)}, sort_keys=True).encode()
                         + labels.tobytes()).hexdigest()[:16]
    path = loaded.path / runfolder.INSPECT_DIR / f"train-folds-{folds}-{key}.safetensors"
    record = {"folds": folds, "epochs": config.epochs, "repeats": config.repeats, "model": config.model,
              "file": str(path.relative_to(loaded.path))}
    if path.is_file():
        kept = runfolder.load_tensors(path).get("probabilities")
        if kept is not None and tuple(kept.shape) == (len(labels), loaded.spec.num_classes):
            return kept.numpy(), {**record, "reused": True}
    counts = np.bincount(labels, minlength=loaded.spec.num_classes)
    smallest = int(counts[counts > 0].min()) if len(labels) else 0  # a class without training images has no fold
    if smallest < folds:
        raise ConvnetError(f"--train-folds {folds}: the smallest class has {smallest} training images; every fold "
                           "needs one of each class, so use fewer folds")
    probs = np.zeros((len(labels), loaded.spec.num_classes), dtype=np.float32)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    engine = single_process(loaded.engine)
    for k, (fit_rows, held_rows) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if progress:
            print(f"fold {k + 1}/{folds}: training {config.model} on {len(fit_rows):,} images for {config.epochs} "
                  f"epochs, predicting the other {len(held_rows):,}", flush=True)
        data = Dataset(loaded.run.config["data"]["name"], loaded.spec, train_split.take(fit_rows),
                       train_split.take(fit_rows[:0]), "")
        result = train_run(TrainRequest(settings=config, data=data, progress=progress), engine=engine,
                           stream=sys.stdout if progress else None).result
        fold = LoadedRun(loaded.run, engine, result.model.eval())
        probs[held_rows] = fold.probabilities(train_split.take(held_rows).images)
    path.parent.mkdir(exist_ok=True)
    runfolder.save_tensors(path, {"probabilities": torch.from_numpy(probs)})
    return probs, {**record, "reused": False}


def inspect_run(path: PathLike, *, train_folds: int | None = None, calibrate: bool = False,
                data_dir: PathLike | None = None, device: str = "auto", progress: bool = True) -> Inspection:
    """What ``convnet inspect RUN`` computes (see the module's docstring).

    Args:
        calibrate: with ``train_folds``, fit the run's temperature on the out-of-fold
            probabilities (images the fold models did not train on) and keep it in the run
            (``calibration.json``), replacing any other; the test split is then scored with it.

    Raises:
        ConvnetError: not a run folder, its data not found, ``train_folds`` below 2, a
            class with fewer training images than folds, ``calibrate`` without folds.
    """
    if train_folds is not None and train_folds < 2:
        raise ConvnetError(f"--train-folds must be at least 2, got {train_folds}")
    if calibrate and train_folds is None:
        raise ConvnetError("--calibrate fits the temperature on out-of-fold probabilities: give --train-folds K "
                           "(or train with `convnet train --calibrate`)")
    loaded = load_run(path, device=device)
    dataset: Dataset = loaded.dataset(data_dir, progress=progress)
    folds, oof = None, None
    if train_folds is not None:
        if len(dataset.train) == 0:
            raise ConvnetError(f"{loaded.path}: the run keeps no training images, so --train-folds has none to check")
        oof, folds = out_of_fold(loaded, dataset.train, train_folds, progress=progress)
    if calibrate and oof is not None:
        logits = torch.from_numpy(np.log(np.clip(oof, 1e-12, None)))  # log-probabilities: logits up to a constant
        t = fit_temperature(logits, dataset.train.labels)
        runfolder.write_calibration(loaded.path, {"temperature": t, "fitted_on": f"out-of-fold probabilities of "
                                             f"{train_folds} folds", "images": len(oof)})
        loaded = load_run(loaded.run, engine=loaded.engine)  # with the temperature now
    classes = dataset.classes
    test_labels = dataset.test.labels.cpu().numpy()
    if len(test_labels) == 0:
        raise ConvnetError(f"{loaded.path}: the run's test split is empty: there is nothing to inspect")
    test_probs = loaded.probabilities(dataset.test.images).astype(np.float64)
    files = dataset.files or {}
    issues = label_issues(test_probs, test_labels, "test", files.get("test"))
    if oof is not None:
        issues = label_issues(oof.astype(np.float64), dataset.train.labels.cpu().numpy(), "train",
                              files.get("train")) + issues
    reports, pairs = per_class(test_probs, test_labels, classes)
    splits = {"train": dataset.train.images, "test": dataset.test.images}
    flagged = [splits[i.split][torch.tensor([i.index])][0].cpu() for i in issues[:SHOWN]]
    return Inspection(run=loaded.path, classes=classes, test_images=len(test_labels),
                      test_accuracy=float((test_probs.argmax(1) == test_labels).mean()), issues=issues,
                      calibration=calibration(test_probs, test_labels), per_class=reports, confused=pairs,
                      folds=folds, temperature=run_temperature(loaded.run),
                      mistakes=explained_mistakes(loaded, dataset.test.images, test_probs, test_labels),
                      flagged=torch.stack(flagged).numpy() if flagged else None)


SHOWN = 18  # images in the grids of mistakes and of likely label errors (3 rows of 6)


def explained_mistakes(loaded: LoadedRun, images: Any, probs: np.ndarray, labels: np.ndarray
                       ) -> dict[str, np.ndarray]:
    """The most confidently wrong test images, each with the heat map of the class it was
    given laid over it (:mod:`convnet.use.explain`), for the grid ``convnet inspect`` draws."""
    from convnet.trust import plots  # imported here: matplotlib only when drawing

    rows = plots.top_mistakes(probs, labels, SHOWN)
    predicted = probs.argmax(1)
    none = torch.zeros((0, *loaded.spec.shape), dtype=torch.uint8)  # a model without a mistake
    chosen = images[torch.from_numpy(rows)].cpu() if len(rows) else none
    return {"images": explained(loaded.model, chosen, predicted[rows]), "labels": labels[rows],
            "predicted": predicted[rows], "confidence": probs[rows, predicted[rows]]}


def write_issues_csv(inspection: Inspection, out: Path) -> None:
    """The flagged rows as CSV: rank, split, index, path, given and suggested class, probabilities."""
    import csv

    with atomic_file(out, text=True) as f:
        table = csv.writer(f)
        table.writerow(["rank", "split", "index", "path", "given_class", "suggested_class", "confidence",
                        "given_probability"])
        for i in inspection.issues:
            table.writerow([i.rank, i.split, i.index, i.path or "", inspection.classes[i.given],
                            inspection.classes[i.suggested], f"{i.confidence:.6f}", f"{i.given_probability:.6f}"])


def inspect_and_plot(path: PathLike, *, train_folds: int | None = None, calibrate: bool = False,
                     data_dir: PathLike | None = None, device: str = "auto", progress: bool = True,
                     csv: PathLike | None = None) -> tuple[Inspection, Path]:
    """What ``convnet inspect RUN`` does: :func:`inspect_run`, the findings kept in
    ``RUN/inspect.json`` (for ``convnet report``) and the reliability diagram drawn into
    ``RUN/plots/reliability.png``; with ``csv``, every likely label error written to that
    table (checked before anything is computed).

    Returns:
        The findings and the diagram's path.
    """
    if csv is not None:
        check_output_file(Path(csv), "--csv")
    found = inspect_run(path, train_folds=train_folds, calibrate=calibrate, data_dir=data_dir, device=device,
                        progress=progress)
    from convnet.trust import plots  # imported here: matplotlib only when drawing

    c = found.calibration
    diagram = runfolder.write_plot(found.run, DIAGRAM, plots.save(plots.plot_reliability(c.bins, c.ece, c.low, c.high,
                                                                                     found.run.name)))
    if found.mistakes is not None:
        m = found.mistakes
        title = (f"The most confidently wrong test images and the evidence for the class given (integrated "
                 f"gradients): {found.run.name}")
        runfolder.write_plot(found.run, EXPLAINED, plots.save(plots.plot_image_grid(
            m["images"], m["labels"], m["predicted"], m["confidence"], found.classes, title)))
    runfolder.plot_path(found.run, FLAGGED).unlink(missing_ok=True)  # an earlier inspection's, when nothing is flagged
    if found.flagged is not None:
        shown = found.issues[:len(found.flagged)]
        title = (f"The {len(shown)} most likely label errors of {len(found.issues):,} flagged (given label, and the "
                 f"class the model sees): {found.run.name}")
        runfolder.write_plot(found.run, FLAGGED, plots.save(plots.plot_image_grid(
            found.flagged, np.array([i.given for i in shown]), np.array([i.suggested for i in shown]),
            np.array([i.confidence for i in shown]), found.classes, title, captions=("given", "seen"))))
    runfolder.write_inspection(found.run, found.to_json())
    if csv is not None:
        write_issues_csv(found, Path(csv))
    return found, diagram


ISSUES_SHOWN = 20  # label issues listed in the report (`convnet inspect --csv` writes them all)


def inspection_html(run: Path) -> str:
    """A run's "Can I trust it?" section of the report, from ``RUN/inspect.json`` (empty
    where the run was not inspected, or its findings cannot be read)."""
    try:
        found = json.loads((run / runfolder.INSPECTION).read_text(encoding="utf-8"))
        c, issues = found["calibration"], found["label_issues"]
        ece = f"{c['ece']:.2%} (95 % interval {c['low']:.2%}–{c['high']:.2%})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    diagram, flagged = runfolder.plot_path(run, DIAGRAM), runfolder.plot_path(run, FLAGGED)
    rows = [[i["rank"], i["split"], i["index"], i.get("path") or "", i["given_class"], i["suggested_class"],
             f"{i['confidence']:.3f}"] for i in issues[:ISSUES_SHOWN]]
    per_class = [[r["name"], r["support"], f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
                 for r in found.get("per_class", [])]
    confused = [[p["true"], p["predicted"], p["images"]] for p in found.get("confused", [])]
    shown = f"; the first {ISSUES_SHOWN} shown" if len(issues) > ISSUES_SHOWN else ""
    return "".join([
        "<h3>Can I trust it? (<code>convnet inspect</code>)</h3>",
        f"<p>Calibration on {found.get('test_images', 0):,} test images: expected calibration error {ece}.</p>",
        img(diagram.read_bytes(), "reliability diagram") if diagram.is_file() else "",
        f"<p>{len(issues):,} likely label errors (confident learning){shown}.</p>",
        img(flagged.read_bytes(), "likely label errors") if flagged.is_file() and issues else "",
        table(["rank", "split", "image", "file", "given class", "suggested class", "confidence"], rows) if rows else "",
        '<div class="row"><div>', table(["class", "support", "precision", "recall"], per_class), "</div><div>",
        table(["true class", "predicted as", "test images"], confused) if confused else "", "</div></div>",
    ])
