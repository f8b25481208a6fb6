"""``convnet serve --workers N`` as real processes on 127.0.0.1: one port for all, the printed
address once, ``/metrics`` summed over the workers, SIGTERM stopping every worker after the
requests in flight, a worker that dies stopping the server, and the metrics folder removed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from convnet.cli.parser import main
from convnet.use.loadtest import multipart_body
from convnet.use.workers import MAX_WORKERS

from .test_serve import fastnet_onnx, grey_png
from .test_servemetrics import samples, value


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fastnet_onnx(tmp_path_factory.mktemp("workers"), tta=False)


@pytest.fixture(scope="module")
def png(onnx_file: Path) -> bytes:
    return grey_png(onnx_file.parent).read_bytes()


class Server:
    """``convnet serve MODEL --workers 2 --port 0`` with its own temporary folder (``TMPDIR``),
    where the server's folder (the model for the workers, their metrics) can be seen."""

    def __init__(self, model: Path, tmp: Path, *flags: str) -> None:
        self.tmp = tmp
        tmp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "convnet", "serve", str(model), "--workers", "2",
                                      "--port", "0", *flags], env={**os.environ, "TMPDIR": str(tmp)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"on (http://127\.0\.0\.1:\d+/) with 2 workers", self.first_line)
        assert m, self.first_line + self.proc.stderr.read()  # type: ignore[union-attr]
        self.url = m.group(1)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> str:
        status, text = self.get("metrics")
        assert status == 200
        return text

    def wait(self, done: Callable[[str], bool], timeout_s: float = 60) -> str:
        """``/metrics`` once ``done`` says yes of it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                text = self.metrics()
                if done(text):
                    return text
            except OSError:  # no worker listening yet
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "the server did not get there in time"
            time.sleep(0.05)

    def worker_pids(self, text: str) -> dict[int, float]:
        return {int(ls["pid"]): v for n, ls, v in samples(text) if n == "convnet_worker_requests"}

    def metrics_folders(self) -> list[Path]:
        return list(self.tmp.glob("convnet-serve-*/metrics"))


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:  # whatever a failed test left running
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:  # a new connection each time
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_two_workers_on_one_port_sum_their_metrics_and_a_dead_worker_stops_the_server(
        onnx_file: Path, png: bytes, tmp_path: Path, servers: list[Server]) -> None:
    server = Server(onnx_file, tmp_path)
    servers.append(server)
    text = server.wait(lambda t: value(t, "convnet_workers_ready") == 2)
    assert server.get("ready") == (200, '{"status":"ready"}')
    [folder] = server.metrics_folders()
    assert list(folder.glob("*.db"))  # the workers' values, in files
    one, ctype = multipart_body([png])
    two, _ = multipart_body([png, png])
    sent = {"ok": 0, "images": 0, "bad": 0}
    statuses: list[int] = []

    def client() -> None:
        for body, images in ((one, 1), (two, 2)):
            status, answer = post(server.url + "predict", body, ctype)
            statuses.append(status)
            sent["ok"] += 1
            sent["images"] += images
            assert len(answer["predictions"]) == images
        statuses.append(post(server.url + "predict", b"{}", "text/plain")[0])  # 415
        sent["bad"] += 1

    for _ in range(20):  # rounds of 8 clients until both workers have answered (the kernel spreads connections)
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        pids = server.worker_pids(server.metrics())
        if len(pids) == 2 and all(n > 0 for n in pids.values()):
            break
    assert sorted(set(statuses)) == [200, 415] and len(statuses) == sent["ok"] + sent["bad"]
    text = server.metrics()
    pids = server.worker_pids(text)
    assert len(pids) == 2 and server.proc.pid not in pids and all(n > 0 for n in pids.values()), pids
    assert value(text, "convnet_requests_total", path="/predict", status="200") == sent["ok"]
    assert value(text, "convnet_requests_total", path="/predict", status="415") == sent["bad"]
    assert value(text, "convnet_request_duration_seconds_count", path="/predict") == sent["ok"] + sent["bad"]
    assert value(text, "convnet_images_predicted_total") == sent["images"]
    assert value(text, "convnet_batch_images_sum") == sent["images"] + 2  # and each worker's warm-up image
    assert sum(pids.values()) == value(text, "convnet_requests_total")  # every request answered by one of them
    info = [(ls["model"], ls["file"], v) for n, ls, v in samples(text) if n == "convnet_model_info"]
    assert info == [("fastnet", "model.onnx", 1.0)]  # one series, not one per worker

    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    assert server.proc.wait(timeout=90) == 1
    err = server.proc.stderr.read()  # type: ignore[union-attr]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"convnet: error: worker [01] \(pid {victim}\) stopped on its own \(killed by SIGKILL\); "
                        r"stopped the other 1 and the server\n", err), err
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)
    assert server.metrics_folders() == [] and list(tmp_path.glob("convnet-serve-*")) == []


def test_sigterm_stops_every_worker_after_the_requests_in_flight(onnx_file: Path, png: bytes, tmp_path: Path,
                                                                 servers: list[Server]) -> None:
    server = Server(onnx_file, tmp_path, "--batch-wait-ms", "1000")  # each request waits 1 s for company
    servers.append(server)
    pids = server.worker_pids(server.wait(lambda t: value(t, "convnet_workers_ready") == 2))
    assert len(pids) == 2
    body, ctype = multipart_body([png])
    answers: list[tuple[int, dict]] = []
    senders = [threading.Thread(target=lambda: answers.append(post(server.url + "predict", body, ctype)))
               for _ in range(4)]
    for t in senders:
        t.start()
    server.wait(lambda t: value(t, "convnet_requests_in_progress") == 5)  # the 4, and this /metrics request
    server.proc.send_signal(signal.SIGTERM)
    for t in senders:
        t.join(timeout=60)
    assert [status for status, _ in answers] == [200] * 4
    assert all(len(answer["predictions"]) == 1 for _, answer in answers)
    assert server.proc.wait(timeout=90) == 0
    out, err = server.proc.communicate()
    assert "serving" not in out  # the address was printed once, before the workers started
    assert err == "server stopped\n"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert server.metrics_folders() == [] and list(tmp_path.glob("convnet-serve-*")) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "health", timeout=5)


@pytest.mark.parametrize("workers", ["0", "-2", str(MAX_WORKERS + 1)])
def test_the_workers_flag_is_checked_before_anything_is_loaded(workers: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "missing.onnx"), "--port", "0", f"--workers={workers}"]) == 1
    err = capsys.readouterr().err
    assert err == f"convnet: error: --workers must be between 1 and {MAX_WORKERS}, got {workers}\n"
