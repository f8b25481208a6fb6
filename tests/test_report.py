"""Plots and reports: the numbers behind each picture against scikit-learn, the plots and
the HTML report of two tiny runs through the command line, and the report rendered in
headless Chromium (every image decodes, the tables hold the run's numbers, the page is
not blank)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.data.named import load_dataset
from convnet.training.config import TrainConfig
from convnet.training.loop import train
from convnet.training.run import data_record
from convnet.trust import plots, report
from convnet.trust.scoring import evaluate_run
from convnet.use.explain import explained

CLASSES = [f"class {i}" for i in range(4)]


# --- the numbers behind the plots


def _toy_scores(n: int = 200, c: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, c, n)
    return probs, probs.argmax(axis=1), labels


def test_top_mistakes_are_the_most_confident_wrong_predictions() -> None:
    probs, preds, labels = _toy_scores()
    idx = plots.top_mistakes(probs, labels, 10)
    wrong = [i for i in range(len(labels)) if preds[i] != labels[i]]
    expected = sorted(wrong, key=lambda i: (-probs[i, preds[i]], i))[:10]
    assert idx.tolist() == expected
    assert len(plots.top_mistakes(probs, labels, 10_000)) == len(wrong)
    assert plots.top_mistakes(np.eye(3), np.arange(3), 5).size == 0  # no mistakes


def test_history_curves_handle_absent_and_null_validation() -> None:
    history = [{"epoch": 1, "loss": 2.0, "seconds": 1.0},
               {"epoch": 2, "loss": 1.0, "val_loss": None, "val_accuracy": 0.5},
               {"epoch": 3, "loss": 0.5, "val_loss": 0.7, "val_accuracy": 0.6}]
    c = plots.history_curves(history)
    assert c["epoch"].tolist() == [1, 2, 3] and c["loss"].tolist() == [2.0, 1.0, 0.5]
    assert np.isnan(c["val_loss"][:2]).all() and c["val_loss"][2] == 0.7
    assert np.isnan(c["val_accuracy"][0]) and c["val_accuracy"][1:].tolist() == [0.5, 0.6]
    assert np.isnan(c["accuracy"]).all()
    fig = plots.plot_history(history, "toy")  # draws with gaps, and without any validation at all
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]
    plots.save(plots.plot_history(history[:1], "one epoch"))


def test_confusion_heat_map_holds_scikit_learns_matrix() -> None:
    _, preds, labels = _toy_scores()
    from convnet.trust import metrics

    cm = metrics.confusion_matrix(preds, labels, len(CLASSES))
    fig = plots.plot_confusion(cm, CLASSES, "toy")
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), skm.confusion_matrix(labels, preds))
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class" and ax.get_title()
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(cm.ravel().tolist())  # every cell written


def test_class_score_bars_are_scikit_learns_scores() -> None:
    _, preds, labels = _toy_scores()
    from convnet.trust import metrics

    rep = metrics.classification_report(preds, labels, CLASSES)
    p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=range(4), zero_division=0)
    np.testing.assert_allclose(plots.class_scores(rep, CLASSES), [p, r, f])
    fig = plots.plot_class_scores(rep, CLASSES, "toy")
    bars = [b.get_width() for b in fig.axes[0].patches]
    np.testing.assert_allclose(bars, np.concatenate([p, r, f]))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["precision", "recall", "f1"]


def test_f1_differences_are_differences_of_scikit_learns_f1() -> None:
    _, preds, labels = _toy_scores()
    other = np.where(np.arange(len(preds)) % 3 == 0, labels, preds)  # a better run
    from convnet.trust import metrics

    reports = [metrics.classification_report(x, labels, CLASSES) for x in (preds, other)]
    table = plots.f1_table(reports, CLASSES)
    np.testing.assert_allclose(table, [skm.f1_score(labels, x, average=None) for x in (preds, other)])
    fig = plots.plot_f1_differences(reports, ["a", "b"], CLASSES)
    np.testing.assert_allclose([b.get_width() for b in fig.axes[0].patches], table[1] - table[0])


def test_image_grid_captions() -> None:
    images = np.zeros((3, 1, 28, 28), np.uint8)
    fig = plots.plot_image_grid(images, np.array([0, 1, 2]), np.array([0, 2, 2]), np.array([0.9, 0.8, 0.55]),
                                CLASSES, "toy", cols=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: class 0\npred: class 0 90%", "true: class 1\npred: class 2 80%",
                      "true: class 2\npred: class 2 55%"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["right prediction", "wrong prediction"]
    none = np.array([], dtype=int)
    empty = plots.plot_image_grid(images[:0], none, none, np.array([]), CLASSES, "no mistakes")
    assert not empty.legends and plots.save(empty).startswith(b"\x89PNG")
    flagged = plots.plot_image_grid(images, np.array([0, 1, 2]), np.array([1, 2, 0]), np.array([0.9, 0.8, 0.55]),
                                    CLASSES, "likely label errors", captions=("given", "seen"))
    assert [ax.get_title() for ax in flagged.axes if ax.get_title()][0] == "given: class 0\nseen: class 1 90%"
    assert not flagged.legends  # a likely label error is not a wrong prediction


def test_image_grid_shows_colour() -> None:
    images = np.zeros((2, 3, 16, 16), np.uint8)
    images[:, 0] = 255  # pure red thumbnails
    fig = plots.plot_image_grid(images, np.array([0, 1]), np.array([0, 1]), np.array([0.9, 0.8]), CLASSES, "colour")
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (16, 16, 3) and int(shown[..., 0].min()) == 255 and int(shown[..., 1].max()) == 0


# --- two tiny runs, scored and drawn by the command line (`evaluate`, `compare`, `report`)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from .conftest import make_dataset_dir

    base = tmp_path_factory.mktemp("report")
    data = make_dataset_dir(base / "data")
    dataset = load_dataset("fashion-mnist", data, subset=200)
    out = []
    for optimizer, lr in (("sgd", 0.05), ("adam", 0.003)):  # no evaluation yet: `report` and `compare` must do it
        config = TrainConfig(model="seed", optimizer=optimizer, lr=lr, epochs=2, batch_size=32)
        run = runfolder.new_run_dir(base / optimizer, optimizer)
        train(config, dataset.train, dataset.spec, run_dir=run, data_record=data_record(dataset))
        out.append(run)
    return data, out[0], out[1]


def test_evaluate_writes_the_plots(two_runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, sgd, _ = two_runs
    assert main(["evaluate", "--device", "cpu", str(sgd)]) == 0
    assert f"Plots in {sgd / 'plots'}" in capsys.readouterr().out
    for name in report.PLOT_FILES:
        with Image.open(sgd / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 400, name
    assert not list((sgd / "plots").glob(".*"))  # no temporary files left


def test_the_mistakes_are_drawn_with_the_heat_map_of_the_class_given(two_runs: tuple[Path, Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, sgd, _ = two_runs
    seen = []

    def spy(model: torch.nn.Module, images: torch.Tensor, targets: np.ndarray) -> np.ndarray:
        seen.append((images.clone(), targets.copy()))
        return explained(model, images, targets)

    monkeypatch.setattr(report, "explained", spy)
    ev, _ = report.evaluate_and_plot(sgd, device="cpu", progress=False)
    probs, labels = ev.test.probabilities.numpy(), ev.test_labels.numpy()
    rows = plots.top_mistakes(probs, labels, report.GRID_IMAGES)
    (images, targets), = seen  # the mistakes grid only: the samples grid is drawn as the images are
    np.testing.assert_array_equal(targets, probs[rows].argmax(1))
    assert len(rows) > 0 and images.shape[0] == len(rows)


def test_summary_numbers_are_the_runs_numbers(two_runs: tuple[Path, Path, Path]) -> None:
    _, sgd, _ = two_runs
    ev = evaluate_run(sgd, device="cpu")
    s = report.load_summary(sgd, device="cpu")
    assert s.test_accuracy == pytest.approx(ev.test.accuracy) and s.train_accuracy == pytest.approx(ev.train.accuracy)
    np.testing.assert_array_equal(np.array(s.metrics["test"]["confusion_matrix"]),
                                  skm.confusion_matrix(ev.test_labels.numpy(), ev.test.predictions.numpy()))


def test_compare_in_the_terminal(two_runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, sgd, adam = two_runs
    assert main(["compare", "--device", "cpu", str(sgd), str(adam)]) == 0
    text = capsys.readouterr().out
    metrics = [json.loads((r / runfolder.METRICS).read_text()) for r in (sgd, adam)]
    header = text.splitlines()[0].split()
    assert header == ["run", "sgd", "adam"]
    test_row = next(line for line in text.splitlines() if line.startswith("test accuracy")).split()
    assert test_row[2:] == [f"{m['test']['accuracy']:.3f}" for m in metrics]
    f1 = [m["test"]["report"]["Ankle boot"]["f1-score"] for m in metrics]
    assert f"{f1[1] - f1[0]:+.3f}" in next(line for line in text.splitlines() if line.startswith("Ankle boot"))
    assert "epoch 2" in text and "adam-sgd" in text


def test_compare_keeps_values_longer_than_the_names_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    found = report.Comparison(["a", "b"], [("model", ["fastnet-lean", "fastnet-lean"])], ["Bag"], [[0.5, 0.75]])
    monkeypatch.setattr(report, "comparison", lambda summaries: found)
    text = report.format_comparison([SimpleNamespace(history=[]), SimpleNamespace(history=[])])  # type: ignore[list-item]
    assert text.splitlines()[1].split() == ["model", "fastnet-lean", "fastnet-lean"]


def test_report_is_self_contained_and_redraws_missing_plots(two_runs: tuple[Path, Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, sgd, adam = two_runs
    shutil.rmtree(adam / "plots", ignore_errors=True)
    out = tmp_path / "r.html"
    assert main(["report", "--device", "cpu", str(sgd), str(adam), "--html", str(out)]) == 0
    assert f"Report written to {out}" in capsys.readouterr().out
    assert all((adam / "plots" / f"{n}.png").is_file() for n in report.PLOT_FILES)
    page = out.read_text()
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', page)  # nothing fetched from elsewhere
    assert page.count('<img src="data:image/png;base64,') == 3 + 2 * len(report.PLOT_FILES)
    assert "Comparison" in page and page.index("Comparison") < page.index("Run sgd") < page.index("Run adam")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--device", "cpu", "/nonexistent-run"], "no such run folder"),
        (["compare", "--device", "cpu", "/nonexistent-run"], "no such run folder"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("convnet: error: ")


def test_report_into_a_missing_folder_and_a_run_without_weights(two_runs: tuple[Path, Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, sgd, _ = two_runs
    assert main(["report", "--device", "cpu", str(sgd), "--html", str(tmp_path / "no" / "such" / "r.html")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (runfolder.CONFIG, runfolder.HISTORY):
        shutil.copy(sgd / name, bare / name)
    assert main(["report", "--device", "cpu", str(bare)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and err.count("\n") == 1


# --- the report in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(page: Path, profile: Path, *args: str) -> str:
    p = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],  # type: ignore[list-item]
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, sgd, adam = two_runs
    page = report.build_report([sgd, adam], tmp_path / "report.html", device="cpu")
    dom = chromium(page, tmp_path / "profile-dom", "--dump-dom")
    # the page's own script counts, after load, the images that decoded (naturalWidth > 0)
    body = re.search(r'<body data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert body is not None, "the page's load script did not run"
    loaded, total = map(int, body.groups())
    assert total == dom.count("<img ") == 3 + 2 * len(report.PLOT_FILES) and loaded == total
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", dom)
    for run in (sgd, adam):
        m = json.loads((run / runfolder.METRICS).read_text())
        assert f"{m['test']['accuracy']:.3f}" in cells and f"{m['train']['accuracy']:.3f}" in cells
        r = m["test"]["report"]["Trouser"]
        assert {f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1-score']:.3f}"} <= set(cells)
    shot = tmp_path / "shot.png"
    chromium(page, tmp_path / "profile-shot", "--window-size=1280,2000", f"--screenshot={shot}")
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=float)
        colours = len(im.convert("RGB").getcolors(1 << 24) or [])
    assert grey.shape == (2000, 1280)
    assert grey.std() > 10 and colours > 100  # text, tables and plots, not a blank page
    assert (grey < 200).mean() > 0.02
