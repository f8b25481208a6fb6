"""The prediction service: answers that match `convnet predict`, every bad input a 4xx
with an error and the next request still answered, batching, SIGTERM, a short load test
on 127.0.0.1, and the page driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import build_parser, main
from convnet.core.errors import ConvnetError
from convnet.data.arrays import load_image
from convnet.use.export import export_run
from convnet.use.loadtest import (
    check_loopback,
    multipart_body,
    parse_wrk,
    python_load,
    run_wrk,
    start_server,
    stop_server,
)
from convnet.use.onnxfile import open_onnx
from convnet.use.prediction import TOP_K, predict_files
from convnet.use.serve import ServeOptions, create_app

from .conftest import make_dataset_dir
from .test_export import untrained_run


def fastnet_onnx(base: Path, tta: bool) -> Path:
    """An untrained fastnet run on toy data, exported to ONNX: the model the service's tests serve."""
    toy = make_dataset_dir(base / "toy", n_train=32, n_test=64)
    return export_run(untrained_run(base / "run", "fastnet", toy, tta=tta), base / "model.onnx",
                      progress=False).path


def grey_png(folder: Path) -> Path:
    """A plain grey 28x28 PNG file in ``folder``."""
    from PIL import Image

    path = folder / "one.png"
    Image.new("L", (28, 28), 200).save(path)
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fastnet_onnx(tmp_path_factory.mktemp("serve"), tta=True)


@pytest.fixture(scope="module")
def pngs(onnx_file: Path) -> list[Path]:
    """Three PNG files: a dark, a light (inverted by the spec) and a large colour picture."""
    rng = np.random.default_rng(1)
    folder = onnx_file.parent / "pngs"
    folder.mkdir()
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L"),
              Image.fromarray(255 - rng.integers(0, 60, (40, 30), dtype=np.uint8), "L"),
              Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB")]
    paths = [folder / f"{i}.png" for i in range(3)]
    for img, p in zip(images, paths, strict=True):
        img.save(p)
    return paths


@pytest.fixture(scope="module")
def client(onnx_file: Path):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    app = create_app(open_onnx(onnx_file), ServeOptions(max_body_mb=0.2, max_images=4))
    with TestClient(app) as c:  # runs the lifespan: the batcher starts and stops with it
        yield c


def files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _poll(get, done, timeout_s: float = 30):  # type: ignore[no-untyped-def]
    """``get()`` again until ``done`` says yes of its answer, or ``timeout_s`` pass; the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = get()
        if done(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.02)


def test_answers_match_convnet_predict(client, onnx_file: Path, pngs: list[Path]) -> None:  # type: ignore[no-untyped-def]
    expected = [row for batch in predict_files(onnx_file, pngs) for row in batch]  # type: ignore[union-attr]
    r = client.post("/predict", files=files(*pngs))
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [row.label for row in expected]  # in request order
    assert [p["class"] for p in got] == [row.cls for row in expected]
    assert all(abs(p["probability"] - row.probability) < 1e-5 for p, row in zip(got, expected, strict=True))
    for p in got:
        top = [t["probability"] for t in p["top"]]
        assert len(top) == TOP_K and top == sorted(top, reverse=True) and p["top"][0]["label"] == p["label"]
    # the same images as JSON pixel arrays, uint8 and floats in [0, 1]: the same answers
    spec = open_onnx(onnx_file).spec
    arrays = np.stack([load_image(p, spec).numpy() for p in pngs])  # (3, 1, 28, 28)
    for images in (arrays.tolist(), (arrays[:, 0] / 255.0).tolist()):
        r = client.post("/predict", json={"images": images})
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [row.label for row in expected]


def test_the_input_as_the_model_sees_it(client, onnx_file: Path, pngs: list[Path]) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/predict?include_input=true", files=files(pngs[2]))
    url = r.json()["predictions"][0]["input"]
    assert url.startswith("data:image/png;base64,")
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert seen.shape == (28, 28)  # a 120x90 colour picture, made 28x28 grey
    np.testing.assert_array_equal(seen, load_image(pngs[2], open_onnx(onnx_file).spec).numpy()[0])


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(buffer, "PNG")  # 60 million pixels in a few kB
    return buffer.getvalue()


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[:200]


BAD = [  # (description, request keyword arguments, status, fragment of the error)
    ("not an image", lambda p: {"files": [("file", ("notes.txt", b"hello, world", "text/plain"))]}, 400,
     "not an image file convnet can read"),
    ("truncated image", lambda p: {"files": [("file", ("cut.png", _truncated(p), "image/png"))]}, 400,
     "truncated"),
    ("decompression bomb", lambda p: {"files": [("file", ("bomb.png", _bomb(), "image/png"))]}, 400,
     "decompression bomb"),
    ("empty file", lambda p: {"files": [("file", ("empty.png", b"", "image/png"))]}, 400, "empty file"),
    ("body over the limit", lambda p: {"content": b"x" * 300_000, "headers": {"content-type": "application/json"}},
     413, "over the limit"),
    ("too many images", lambda p: {"files": [("file", (f"{i}.png", p.read_bytes(), "image/png")) for i in range(5)]},
     413, "at most 4"),
    ("too many JSON images", lambda p: {"json": {"images": [[[0] * 28] * 28] * 5}}, 413, "at most 4"),
    ("wrong array shape", lambda p: {"json": {"images": [[[0] * 27] * 28]}}, 400, "shape (1, 28, 27)"),
    ("wrong dtype", lambda p: {"json": {"images": [[["a"] * 28] * 28]}}, 400, "expected numbers"),
    ("booleans", lambda p: {"json": {"images": [[[True] * 28] * 28]}}, 400, "expected numbers"),
    ("ragged arrays", lambda p: {"json": {"images": [[[0] * 28] * 28, [[0] * 28]]}}, 400, "not a regular array"),
    ("NaN", lambda p: {"content": b'{"images": [' + b"[" + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28)
                       + b"]]}", "headers": {"content-type": "application/json"}}, 400, "NaN"),
    ("values out of range", lambda p: {"json": {"images": [[[300] * 28] * 28]}}, 400, "[0, 255]"),
    ("empty request", lambda p: {"content": b"", "headers": {"content-type": "application/json"}}, 400,
     "empty request"),
    ("empty list", lambda p: {"json": {"images": []}}, 400, "non-empty list"),
    ("not JSON", lambda p: {"content": b"{images", "headers": {"content-type": "application/json"}}, 400,
     "not valid JSON"),
    ("JSON without images", lambda p: {"json": {"pictures": []}}, 400, "expected a JSON object"),
    ("wrong content type", lambda p: {"content": p.read_bytes(), "headers": {"content-type": "image/png"}}, 415,
     "not accepted"),
    ("no content type", lambda p: {"content": b"abc"}, 415, "not accepted"),
    ("wrong form field", lambda p: {"files": [("image", ("a.png", p.read_bytes(), "image/png"))]}, 400,
     "unexpected form field 'image'"),
    ("malformed multipart", lambda p: {"content": b"--x\r\nbroken", "headers": {
        "content-type": "multipart/form-data; boundary=x"}}, 400, ""),
    ("bad query value", lambda p: {"files": [("file", ("a.png", p.read_bytes(), "image/png"))],
                                   "params": {"include_input": "maybe"}}, 422, "include_input"),
    ("deeply nested JSON", lambda p: {"content": b"[" * 2000, "headers": {"content-type": "application/json"}}, 400,
     "nested too deeply"),
    ("JSON number of 5,000 digits", lambda p: {"content": b'{"images": [' + b"9" * 5000 + b"]}",
                                               "headers": {"content-type": "application/json"}}, 400,
     "a number with too many digits"),
    ("Content-Length of 5,000 digits", lambda p: {"content": b"{}", "headers": {
        "content-type": "application/json", "content-length": "9" * 5000}}, 413, "more than 10^18 bytes"),
    ("Content-Length not a number", lambda p: {"content": b"{}", "headers": {
        "content-type": "application/json", "content-length": "2e3"}}, 400, "'2e3' is not a number"),
]


@pytest.mark.parametrize(("what", "request_args", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_it_and_the_next_request_is_answered(  # type: ignore[no-untyped-def]
        client, pngs: list[Path], what: str, request_args, status: int, fragment: str) -> None:
    r = client.post("/predict", **request_args(pngs[0]))
    assert r.status_code == status, (what, r.status_code, r.text)
    assert set(r.json()) == {"error"} and fragment in r.json()["error"], r.json()
    good = client.post("/predict", files=files(pngs[0]))
    assert good.status_code == 200 and len(good.json()["predictions"]) == 1


def test_other_routes(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/health").json() == {"status": "ok"}
    about = client.get("/model").json()
    assert about["input"]["height"] == 28 and len(about["classes"]) == 10 and about["backend"] == "onnxruntime"
    assert about["limits"]["max_images"] == 4 and about["parity"]["passed"] is True
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").json()
    page = client.get("/").text
    assert 'id="file"' in page and "<script src" not in page and "http://" not in page and "https://" not in page


def test_flags_are_checked_and_the_default_host_is_loopback(onnx_file: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["serve", "x.onnx"]).host == "127.0.0.1"
    for flags, message in ((["--port", "70000"], "--port must be between"), (["--max-batch", "0"], "--max-batch"),
                           (["--max-images", "0"], "--max-images"), (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
                           (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
                           (["--host", "no.such.host.invalid"], "--host"),
                           (["--host", "a..b"], "--host a..b: not a valid host name")):
        assert main(["serve", str(onnx_file), *flags]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["serve", str(onnx_file.parent / "missing.onnx"), "--port", "0"]) == 1
    assert "no such file" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(onnx_file), "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "choose another --port" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_max_body_mb_must_be_a_finite_number(value: str, onnx_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(onnx_file), f"--max-body-mb={value}"]) == 1  # "=": argparse takes -inf for a flag
    err = capsys.readouterr().err
    assert err.startswith("convnet: error: --max-body-mb must be a finite number of at least 0.001 (MB)")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_model_failing_in_onnx_runtime_is_one_json_error(onnx_file: Path, pngs: list[Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A model that fails at run time (a file changed after its export): 500 with the
    reason as JSON, one line on the server's stderr for the warm-up prediction and one for
    the request, /ready 503 with the reason, and the service still up."""
    import dataclasses

    from fastapi.testclient import TestClient

    class Failing:
        def run(self, *args: object) -> None:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Gemm node")

    model = dataclasses.replace(open_onnx(onnx_file), session=Failing())
    with TestClient(create_app(model, ServeOptions())) as c:
        r = c.post("/predict", files=files(pngs[0]))
        assert r.status_code == 500 and set(r.json()) == {"error"}
        assert "ONNX Runtime failed on this model (Non-zero status code returned while running Gemm node)" \
            in r.json()["error"]
        assert c.get("/health").status_code == 200
        ready = _poll(lambda: c.get("/ready"), lambda r: "failed" in r.text)
        assert ready.status_code == 503 and ready.json()["error"].startswith("the first prediction failed: ")
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err and "the first prediction failed" in err


# --- a real server process


def _post(url: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(onnx_file: Path):  # type: ignore[no-untyped-def]
    proc, url = start_server(onnx_file)
    yield url
    assert stop_server(proc) == 0


def test_short_load_test_then_bad_inputs_then_still_alive(server: str, pngs: list[Path]) -> None:
    """A few seconds of load on 127.0.0.1 with zero errors, the bad-input barrage over
    real connections, and the server still answering afterwards."""
    assert server.startswith("http://127.0.0.1:")
    body, ctype = multipart_body([pngs[0].read_bytes()])
    for clients in (8, 32):
        result = python_load(server + "predict", body, ctype, clients=clients, requests=1500, max_seconds=3)
        assert result.errors == 0 and result.requests > clients, result
    barrage = [(b"hello", "multipart/form-data; boundary=x"), (b"x" * 11_000_000, "application/json"),
               (b"{}", "text/plain"), (b"", "application/json"), (b'{"images": [[[NaN]]]}', "application/json"),
               (multipart_body([_bomb()])[0], ctype), (multipart_body([_truncated(pngs[0])])[0], ctype),
               (multipart_body([pngs[0].read_bytes()] * 300)[0], ctype)]
    for payload, content_type in barrage:
        status, answer = _post(server + "predict", payload, content_type)
        assert 400 <= status < 500 and "error" in answer, (status, answer)
    status, answer = _post(server + "predict", body, ctype)
    assert status == 200 and len(answer["predictions"]) == 1
    with urllib.request.urlopen(server + "health", timeout=10) as r:
        assert r.status == 200


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_wrk_short_load(server: str, pngs: list[Path]) -> None:
    body, ctype = multipart_body([pngs[0].read_bytes()])
    result = run_wrk(server + "predict", body, ctype, clients=32, seconds=3)
    assert result.errors == 0 and result.requests > 32 and result.p50_ms <= result.p99_ms


def test_sigterm_lets_the_request_in_flight_finish(onnx_file: Path, pngs: list[Path]) -> None:
    proc, url = start_server(onnx_file, "--batch-wait-ms", "1000")  # a request waits 1 s for company
    body, ctype = multipart_body([pngs[0].read_bytes()])
    answers: list[tuple[int, dict]] = []
    sender = threading.Thread(target=lambda: answers.append(_post(url + "predict", body, ctype)))
    sender.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the request waits in the batcher
        with urllib.request.urlopen(url + "model", timeout=10) as r:
            if json.loads(r.read())["served"]["requests_waiting"] == 1:
                break
    else:
        pytest.fail("the request never reached the batcher")
    proc.send_signal(15)
    sender.join(timeout=60)
    assert answers and answers[0][0] == 200 and len(answers[0][1]["predictions"]) == 1
    assert proc.wait(timeout=60) == 0
    assert "server stopped" in proc.stderr.read()  # type: ignore[union-attr]
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "health", timeout=5)


def test_wrk_output_is_read_and_only_loopback_is_a_target() -> None:
    out = """Running 3s test @ http://127.0.0.1:8000/predict
  1 threads and 32 connections
  Latency Distribution
     50%   10.50ms
     75%   12.00ms
     90%   15.00ms
     99%    1.20s
  3000 requests in 3.01s, 1.20MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    996.68
"""
    r = parse_wrk(out, 32)
    assert (r.requests, r.seconds, r.p50_ms, r.p99_ms, r.errors) == (3000, 3.01, 10.5, 1200.0, 7)
    assert check_loopback("http://127.0.0.1:9/predict")[1] == 9 and check_loopback("http://[::1]:9/")[0] == "::1"
    for url in ("http://10.0.0.1/predict", "http://192.168.1.2:8000/"):
        with pytest.raises(ValueError, match="this machine only"):
            check_loopback(url)


# --- the page, in a real browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="chromium and chromedriver not installed (apt-get install "
                                                "chromium chromium-driver)")
def test_page_in_headless_chromium_shows_what_convnet_predict_says(server: str, onnx_file: Path, pngs: list[Path],
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shown_by_cli = subprocess.run([sys.executable, "-m", "convnet", "predict", str(onnx_file), str(pngs[0]),
                                   str(pngs[2]), "--json"], capture_output=True, text=True, timeout=300)
    assert shown_by_cli.returncode == 0, shown_by_cli.stderr
    expected = [row["class"] for row in json.loads(shown_by_cli.stdout)]
    browser, driver_path = _chromium()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,700",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server)
        WebDriverWait(driver, 60).until(lambda d: "classes" in d.find_element(By.ID, "about").text)
        for png, cls in zip((pngs[0], pngs[2]), expected, strict=True):  # 28x28 grey; a 120x90 colour picture
            driver.execute_script("document.getElementById('label').removeAttribute('data-label')")
            driver.find_element(By.ID, "file").send_keys(str(png))
            WebDriverWait(driver, 60).until(
                lambda d: d.find_element(By.ID, "label").get_attribute("data-label") is not None)
            assert driver.find_element(By.ID, "label").text == cls
            bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
            assert len(bars) == TOP_K and bars[0].find_element(By.CLASS_NAME, "cls").text == cls
            size = driver.execute_script("const i = document.getElementById('seen'); "
                                         "return [i.naturalWidth, i.naturalHeight];")
            assert size == [28, 28]  # the model's own size, whatever the picture's
        origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(u.startswith(server) or u.startswith("data:") or u.startswith("blob:") for u in origins), origins
    finally:
        driver.quit()


def test_a_run_folder_is_served_through_an_export_it_then_keeps(tmp_path: Path, pngs: list[Path]) -> None:
    from fastapi.testclient import TestClient

    from convnet.use.serve import load_for_serving

    toy = make_dataset_dir(tmp_path / "toy", n_train=16, n_test=16)
    run = untrained_run(tmp_path / "run", "seed", toy, tta=False)
    model = load_for_serving(run)
    assert [p.name for p in run.glob("*.onnx")] == ["model.onnx"]  # the run's kept export: its predictions use it
    with TestClient(create_app(model, ServeOptions())) as c:
        answer = c.post("/predict", files=files(*pngs)).json()["predictions"]
        about = c.get("/model").json()
    from convnet.models.engine import Engine
    from convnet.models.inference import infer
    from convnet.use.loadrun import load_model

    torch_model, loaded = load_model(run, Engine.faithful())  # fp32 as the export: bf16 could flip near-ties
    images = torch.stack([load_image(p, loaded.spec) for p in pngs])
    assert [p["label"] for p in answer] == infer(torch_model, images, engine=Engine.faithful()).argmax(1).tolist()
    assert about["model"] == "seed" and about["test_accuracy"] is None and about["parity"] is None


def test_the_service_answers_unsure_below_min_confidence(onnx_file: Path, pngs: list[Path]) -> None:
    from fastapi.testclient import TestClient

    expected = [row for batch in predict_files(onnx_file, pngs) for row in batch]  # type: ignore[union-attr]
    p = sorted(r.probability for r in expected)[1] + 1e-6  # the two least sure images fall below it
    with TestClient(create_app(open_onnx(onnx_file), ServeOptions(min_confidence=p))) as c:
        got = c.post("/predict", files=files(*pngs)).json()["predictions"]
        assert c.get("/model").json()["limits"]["min_confidence"] == p
    for row, want in zip(got, expected, strict=True):
        unsure = want.probability < p
        assert row["label"] == (None if unsure else want.label)
        assert row["class"] == ("unsure" if unsure else want.cls)
        assert row["top"][0]["label"] == want.label and row["probability"] == want.probability
    assert sum(row["class"] == "unsure" for row in got) == 2
    with pytest.raises(ConvnetError, match=r"--min-confidence must be a probability in \(0, 1\], got 2"):
        ServeOptions(min_confidence=2).validate()
