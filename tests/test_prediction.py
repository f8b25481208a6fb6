"""Prediction: the predict command's output, the same whatever the size of the inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.core import durable, runfolder
from convnet.models.inference import predict
from convnet.models.networks import create_model


@pytest.fixture
def random_run(tmp_path: Path) -> Path:
    """A run folder with an untrained seed model: enough for the predict command."""
    run = tmp_path / "run"
    run.mkdir()
    durable.write_json(run / runfolder.CONFIG, {"train": {"model": "seed"}, "data": {
        "name": "fashion-mnist", "classes": [f"class {i}" for i in range(10)], "image_shape": [1, 28, 28]}})
    runfolder.save_tensors(run / runfolder.WEIGHTS, create_model("seed").state_dict())
    return run


def test_predict_command_output_is_unchanged_by_streaming(random_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli.parser import main
    from convnet.use.loadrun import load_model

    arr = np.random.default_rng(0).integers(0, 256, (9000, 28, 28)).astype(np.uint8)  # three batches of 4096
    np.save(tmp_path / "a.npy", arr)
    Image.fromarray(arr[0], "L").save(tmp_path / "b.png")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), str(tmp_path / "empty.npy"),
                 str(tmp_path / "b.png"), "--json"]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert out == json.dumps(rows, indent=2) + "\n"  # what printing the whole list at once gave
    assert err.count("\n") == 2 and "empty.npy" in err and "1 of 3 inputs could not be read" in err
    model, _ = load_model(random_run)
    whole = predict(model, torch.from_numpy(arr[:, None]))
    assert [r["label"] for r in rows[:9000]] == whole.labels.tolist()
    assert [r["input"] for r in rows] == [f"{tmp_path / 'a.npy'}[{i}]" for i in range(9000)] + [str(tmp_path / "b.png")]
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "empty.npy"), "--json"]) == 1
    assert capsys.readouterr().out == "[]\n"
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "b.png"), str(tmp_path / "a.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    label_column = {re.match(r"\S+ +", line).end() for line in lines}  # type: ignore[union-attr]
    assert len(lines) == 9001 and len(label_column) == 1  # one column width throughout


def _two_class_run(folder: Path) -> Path:
    folder.mkdir()
    durable.write_json(folder / runfolder.CONFIG, {"train": {"model": "fastnet"}, "data": {
        "name": "folder", "classes": ["cat", "dog"], "image_shape": [3, 16, 16]}})
    runfolder.save_tensors(folder / runfolder.WEIGHTS, create_model("fastnet", 2, 3, 16).state_dict())
    return folder


def test_a_folder_of_photos_becomes_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    from convnet.cli.parser import main
    from convnet.use.prediction import predict_files

    run = _two_class_run(tmp_path / "run")
    photos = tmp_path / "photos"
    (photos / "b" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("z.png", "a.jpg", "b/deeper/c.png", "b/a.bmp"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    (photos / ".hidden.png").write_bytes(b"hidden files are passed over silently")
    (photos / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    table = tmp_path / "out.csv"
    assert main(["predict", "--device", "cpu", str(run), str(photos), "--csv", str(table), "--top-k", "5"]) == 1
    out, err = capsys.readouterr()
    assert out == f"4 images predicted, 1 unreadable inputs; table in {table}\n"
    assert "passed over 1 file that is not an image: " in err and "notes.txt" in err and "hidden" not in err
    assert "broken.png" in err and "1 of 5 inputs could not be read" in err
    rows = list(csv.reader(table.open(newline="")))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2", "error"]  # a 2-class run: both
    names = ["a.jpg", "b/a.bmp", "b/broken.png", "b/deeper/c.png", "z.png"]  # sorted, recursive
    assert [r[0] for r in rows[1:]] == [str(photos / n) for n in names]
    broken = rows[3]
    assert broken[1:5] == ["", "", "", ""] and "broken.png" in broken[5]
    expected = {r.input: r for item in predict_files(run, [photos], device="cpu", top_k=2) if isinstance(item, list)
                for r in item}
    for row in (rows[1], rows[2], rows[4], rows[5]):
        p = expected[row[0]]
        assert row[1:5] == [p.top[0][1], f"{p.top[0][2]:.6f}", p.top[1][1], f"{p.top[1][2]:.6f}"] and row[5] == ""
        assert abs(float(row[2]) + float(row[4]) - 1) < 1e-5 and p.top[0][1] == p.cls


def test_a_table_that_cannot_be_written_is_refused_before_anything(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli.parser import main

    run = _two_class_run(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (([str(tmp_path), "--csv", str(tmp_path / "absent" / "t.csv")], "does not exist"),
                          ([str(tmp_path), "--csv", str(tmp_path)], "is a folder"),
                          ([str(empty)], "a folder with no image files"),
                          ([str(tmp_path), "--top-k", "0"], "--top-k must be at least 1")):
        assert main(["predict", "--device", "cpu", str(run), *args]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # nothing written
    (tmp_path / "note.txt").write_text("not an image")
    for given, message in (("note.txt", "not a readable image"), ("absent.png", "no such file")):
        assert main(["predict", "--device", "cpu", str(run), str(tmp_path / given)]) == 1  # one input, one line
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_below_min_confidence_the_answer_is_unsure_with_its_probabilities(random_run: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    from convnet.cli.parser import main

    arr = np.random.default_rng(2).integers(0, 256, (40, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "a.npy", arr)
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    tops = sorted(r["probability"] for r in plain)
    p = (tops[9] + tops[10]) / 2  # 10 of the 40 images fall below it
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), "--json",
                 "--min-confidence", f"{p}"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    for before, row in zip(plain, rows, strict=True):
        assert row["top"] == before["top"] and row["probability"] == before["probability"]  # probabilities kept
        if before["probability"] < p:
            assert row["label"] is None and row["class"] == "unsure"
        else:
            assert row["label"] == before["label"] and row["class"] == before["class"]
    assert sum(r["class"] == "unsure" for r in rows) == 10
    assert err == f"10 of 40 images unsure (most probable class below {p:g})\n"  # JSON stays JSON on stdout

    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), "--min-confidence",
                 f"{p}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 41 and lines[-1] == f"10 of 40 images unsure (most probable class below {p:g})"
    assert sum(" - " in line and "unsure" in line for line in lines[:-1]) == 10

    table = tmp_path / "t.csv"
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), "--csv", str(table),
                 "--min-confidence", f"{p}", "--top-k", "2"]) == 0
    csv_rows = list(csv.reader(table.open(newline="")))
    assert csv_rows[0] == ["path", "answer", "class", "probability", "class_2", "probability_2", "error"]
    assert [r[1] for r in csv_rows[1:]] == [r["class"] for r in rows]
    assert [r[2] for r in csv_rows[1:]] == [r["top"][0]["class"] for r in rows]  # the top class is kept
    assert capsys.readouterr().out.splitlines()[0] == f"10 of 40 images unsure (most probable class below {p:g})"


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_a_min_confidence_that_is_not_a_probability_is_refused(value: str, random_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli.parser import main

    np.save(tmp_path / "a.npy", np.zeros((2, 28, 28), np.uint8))
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), "--min-confidence",
                 value]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--min-confidence must be a probability in (0, 1]" in err
