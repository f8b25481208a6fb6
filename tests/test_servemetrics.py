"""The service's Prometheus metrics and ``/ready`` in one process (the app in FastAPI's test
client): every request counted by path and status, 4xx answers too; latency, batch sizes,
images predicted and the model as an info gauge; ``/ready`` 503 until the first prediction
has run. ``tests/test_workers.py`` checks the same sums over worker processes."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from convnet.core.errors import ConvnetError
from convnet.use.onnxfile import open_onnx
from convnet.use.serve import ServeOptions, create_app
from convnet.use.servemetrics import ServiceMetrics

from .test_serve import _poll, fastnet_onnx, files, grey_png


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fastnet_onnx(tmp_path_factory.mktemp("servemetrics"), tta=False)


@pytest.fixture(scope="module")
def png(onnx_file: Path) -> Path:
    return grey_png(onnx_file.parent)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of Prometheus' text format: ``(name, labels, value)``."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry ``labels``."""
    return sum(v for n, ls, v in samples(text) if n == name and labels.items() <= ls.items())


@pytest.fixture
def client(onnx_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(open_onnx(onnx_file), ServeOptions(max_images=2))) as c:
        assert _poll(lambda: c.get("/ready"), lambda r: r.status_code == 200).status_code == 200
        yield c


def test_every_request_is_counted_by_path_and_status(client: TestClient, onnx_file: Path, png: Path) -> None:
    answers = [client.post("/predict", files=files(png)), client.post("/predict", files=files(png, png)),
               client.post("/predict", files=files(png)),
               client.post("/predict", files=[("file", ("a.txt", b"hello", "text/plain"))]),  # 400
               client.post("/predict", files=files(png, png, png)),  # 413: over --max-images
               client.get("/nowhere"), client.get("/no/such/path")]  # 404, counted as "other"
    assert [r.status_code for r in answers] == [200, 200, 200, 400, 413, 404, 404]
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert value(text, "convnet_requests_total", path="/predict", status="200") == 3
    assert value(text, "convnet_requests_total", path="/predict", status="400") == 1
    assert value(text, "convnet_requests_total", path="/predict", status="413") == 1
    assert value(text, "convnet_requests_total", path="other", status="404") == 2
    assert not [ls for n, ls, _ in samples(text) if n == "convnet_requests_total" and "nowhere" in ls["path"]]
    assert value(text, "convnet_request_duration_seconds_count", path="/predict") == 5
    assert value(text, "convnet_request_duration_seconds_sum", path="/predict") > 0
    assert value(text, "convnet_images_predicted_total") == 4
    # one ONNX Runtime call per request here (one at a time), and the warm-up's call of one image
    assert value(text, "convnet_batch_images_count") == 4 and value(text, "convnet_batch_images_sum") == 5
    assert value(text, "convnet_requests_in_progress") == 1  # this /metrics request
    assert value(text, "convnet_workers_ready") == 1
    assert value(text, "convnet_worker_requests") == value(text, "convnet_requests_total")
    info = [(ls, v) for n, ls, v in samples(text) if n == "convnet_model_info"]
    accuracy = open_onnx(onnx_file).test_accuracy
    assert info == [({"model": "fastnet", "file": "model.onnx", "test_accuracy": str(accuracy)}, 1.0)]


def test_two_apps_in_one_process_count_apart(onnx_file: Path, png: Path) -> None:
    """Each app has a registry of its own, not prometheus-client's global one."""
    with TestClient(create_app(open_onnx(onnx_file), ServeOptions())) as first, \
            TestClient(create_app(open_onnx(onnx_file), ServeOptions())) as second:
        assert first.post("/predict", files=files(png)).status_code == 200
        assert value(first.get("/metrics").text, "convnet_requests_total", path="/predict") == 1
        assert value(second.get("/metrics").text, "convnet_requests_total", path="/predict") == 0


def test_ready_is_503_until_the_first_prediction_has_run(onnx_file: Path, png: Path) -> None:
    gate = threading.Event()
    model = open_onnx(onnx_file)

    class Held:  # the file's own session, held back until the test lets it run
        def run(self, *args: object) -> object:
            gate.wait(timeout=30)
            return model.session.run(*args)

    try:
        with TestClient(create_app(dataclasses.replace(model, session=Held()), ServeOptions())) as c:
            r = c.get("/ready")
            assert r.status_code == 503 and r.json() == {"error": "warming up: the first prediction has not run yet"}
            assert c.get("/health").json() == {"status": "ok"}  # unchanged: the model is loaded
            assert value(c.get("/metrics").text, "convnet_workers_ready") == 0
            gate.set()
            r = _poll(lambda: c.get("/ready"), lambda r: r.status_code == 200)
            assert r.status_code == 200 and r.json() == {"status": "ready"}
            assert value(c.get("/metrics").text, "convnet_workers_ready") == 1
            assert c.post("/predict", files=files(png)).status_code == 200
    finally:
        gate.set()


def test_multiprocess_mode_needs_its_folder_named_before_the_import(tmp_path: Path) -> None:
    with pytest.raises(ConvnetError, match="PROMETHEUS_MULTIPROC_DIR must name"):
        ServiceMetrics("fastnet", "model.onnx", None, multiprocess_dir=tmp_path)
