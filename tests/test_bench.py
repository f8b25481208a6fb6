from __future__ import annotations

import json
from pathlib import Path

from convnet.cli.parser import main
from convnet.data.named import load_dataset
from convnet.models.engine import Engine
from convnet.tools.bench import format_bench, run_bench, time_to_accuracy


def test_bench_measures_both_sides(toy_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", toy_dir)
    r = run_bench(ds, engine=Engine.fast(), train_images=64, batch_size=32, repeats=2)
    for v in (r.tutorial_train_images_per_s, r.convnet_train_images_per_s, r.tutorial_predict_images_per_s,
              r.convnet_predict_images_per_s):
        assert v > 0
    assert abs(r.train_speedup - r.convnet_train_images_per_s / r.tutorial_train_images_per_s) < 1e-9
    assert r.onnx_predict_images_per_s is not None and r.onnx_predict_speedup is not None  # the CPU's path
    assert abs(r.onnx_predict_speedup - r.onnx_predict_images_per_s / r.tutorial_predict_images_per_s) < 1e-9
    text = format_bench(r)
    assert "speed-up" in text and "ONNX Runtime" in text and r.cpu in text
    assert r.engine["cpu"]["name"] == r.cpu and r.cpu_flags == r.engine["cpu"]["flags"]


def test_cpu_info_names_the_flags_that_decide_the_engine(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from convnet.models import engine

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f\n\n")
    real = Path
    monkeypatch.setattr(engine, "Path", lambda p: fake if p == "/proc/cpuinfo" else real(p))
    engine.cpu_info.cache_clear()
    try:
        assert engine.cpu_info() == {"name": "Some CPU 9000", "flags": ["avx2", "fma", "avx512f"]}
        monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
        assert Engine.fast().describe()["cpu"] == {"name": "Some CPU 9000", "flags": ["avx2", "fma", "avx512f"],
                                                   "bf16": False}
    finally:
        engine.cpu_info.cache_clear()


def test_bench_json_from_cli(toy_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--device", "cpu", "--data-dir", str(toy_dir), "--train-images", "64", "--batch-size", "32",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_speedup"] > 0 and out["predict_speedup"] > 0 and out["device"] == "cpu"


def test_time_to_accuracy(toy_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", toy_dir)
    r = time_to_accuracy(ds, engine=Engine.fast(), recipe_name="tutorial", target=0.3, seeds=2, reference=False)
    assert len(r.seconds) == 2 and r.reached == 2 and all(s > 0 for s in r.seconds)
    assert r.to_json()["mean_seconds"] > 0
