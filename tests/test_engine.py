"""The engine: the device chosen once, the tutorial's arithmetic for a faithful run, the
fast path where it was measured faster, and batches that reach the model as it expects."""

from __future__ import annotations

import pytest
import torch

from convnet.core.errors import ConvnetError
from convnet.models import engine as engine_module
from convnet.models.engine import Engine, StepRunner, make_engine, resolve_device, single_process


def test_a_device_is_resolved_once_and_a_wrong_one_named() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConvnetError, match="unknown --device 'tpu'; choose one of: auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_without_a_gpu_says_to_use_the_cpu() -> None:
    with pytest.raises(ConvnetError, match="no CUDA GPU is visible .*use --device cpu"):
        make_engine("cuda")


def test_faithful_is_the_tutorials_plain_arithmetic() -> None:
    e = make_engine("cpu", faithful=True)
    assert e == Engine(torch.device("cpu"))
    assert not e.channels_last and e.autocast is None and not e.fold_batchnorm and e.infer_batch_size == 128
    assert not e.fuse_relu


@pytest.mark.parametrize("bf16", [True, False])
def test_the_fast_cpu_path_uses_bfloat16_only_where_the_cpu_has_it(bf16: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: bf16)
    e = make_engine("cpu")
    assert e.channels_last and e.fold_batchnorm and e.fuse_relu and not e.graphs
    assert e.autocast == (torch.bfloat16 if bf16 else None)
    assert e.describe()["autocast"] == ("bfloat16" if bf16 else None)


@pytest.mark.parametrize(("amx", "batch"), [(True, 128), (False, 512)])
def test_the_cpus_prediction_batch_is_the_one_measured_fastest_for_its_kind(amx: bool, batch: int,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda: amx)
    e = make_engine("cpu")
    assert e.infer_batch_size == batch and e.describe()["infer_batch_size"] == batch
    assert make_engine("cpu", precision="fp32").infer_batch_size == batch  # predicting is fp32 either way


@pytest.mark.parametrize("bf16", [True, False])
def test_precision_overrides_the_cpus_choice_for_training_only(bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: bf16)
    assert make_engine("cpu", precision="fp32").autocast is None
    assert make_engine("cpu", precision="bf16").autocast == torch.bfloat16
    assert make_engine("cpu", precision="auto") == make_engine("cpu")
    assert make_engine("cpu", precision="fp32").describe()["inference"] == "fp32"
    assert make_engine("cpu", faithful=True, precision="bf16") == Engine.faithful()  # the tutorial's arithmetic


@pytest.mark.parametrize(("recorded", "native", "expected", "noted"), [
    ("bfloat16", True, "bf16", False),  # the same kind of CPU: bit for bit
    ("bfloat16", False, "fp32", True),  # a CPU without bfloat16: fp32, said in one line
    (None, True, "fp32", False),  # trained in fp32: fp32 here too, even where bf16 is faster
    ("missing", True, "auto", False),  # an older run that did not record it: as this machine trains
])
def test_a_resumed_run_keeps_its_arithmetic_where_the_cpu_allows(recorded: str | None, native: bool, expected: str,
                                                                 noted: bool, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path) -> None:  # type: ignore[no-untyped-def]
    from convnet.core import runfolder
    from convnet.training.run import resumed_precision

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: native)
    engine = {} if recorded == "missing" else {"autocast": recorded}
    run = runfolder.Run(tmp_path, {"train": {}, "engine": engine}, [])
    precision, note = resumed_precision(run, torch.device("cpu"))
    assert precision == expected
    assert bool(note) == noted and (not noted or "continues in fp32" in note and str(tmp_path) in note)


def test_train_precision_fp32_trains_and_records_fp32_on_a_bf16_cpu(toy_dir, tmp_path, capsys,  # type: ignore[no-untyped-def]
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.cli.parser import main
    from convnet.core import runfolder

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: True)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(toy_dir), "--subset", "64", "--epochs", "1", "--model", "seed",
                 "--precision", "fp32", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    config = runfolder.read_json(out / runfolder.CONFIG)
    assert config["engine"]["autocast"] is None and config["train"]["precision"] == "fp32"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("recipe cpu-fp32 (the default where training is fp32: chosen for it), training in "
                                 "fp32 (--precision fp32; CPU flags")
    assert config["engine"]["cpu"]["bf16"] is True  # the CPU could have: the flag decided


def test_a_batch_reaches_the_model_as_floats_in_its_layout() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 10), dtype=torch.uint8)
    x = Engine.fast().batch(images)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, images.float() / 255.0)  # the tutorial's X / 255.0, exactly
    assert Engine.faithful().batch(images).is_contiguous()


def test_on_the_cpu_a_step_runs_eagerly_and_single_process_resets_the_rank() -> None:
    calls = []

    def step(**tensors: torch.Tensor) -> torch.Tensor:
        calls.append(sorted(tensors))
        return tensors["labels"].float().sum()

    runner = StepRunner(step, Engine(torch.device("cpu"), graphs=True))  # graphs asked for, but no CUDA
    assert float(runner(images=torch.zeros(2), labels=torch.tensor([1, 2]))) == 3.0
    assert runner.graph is None and calls == [["images", "labels"]]
    worker = Engine(torch.device("cpu"), rank=3, world_size=4)
    assert not worker.is_main and single_process(worker).is_main and single_process(worker).world_size == 1


@pytest.mark.parametrize("bf16", [True, False])
def test_the_first_line_says_the_recipe_and_why_it_trains_in_that_arithmetic(bf16: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.training.config import TrainConfig
    from convnet.training.run import arithmetic_line

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: bf16)
    line = arithmetic_line(None, TrainConfig(), make_engine("cpu"))
    assert line.startswith("recipe cpu (the default on a CPU that trains in bfloat16), training in bf16" if bf16 else
                           "recipe cpu-fp32 (the default where training is fp32: chosen for it), training in fp32")
    assert ("computes bfloat16 natively" if bf16 else "has no native bfloat16 (no AVX512-BF16 or AMX") in line
    assert arithmetic_line("tutorial", TrainConfig(faithful=True), make_engine("cpu", faithful=True)) == \
        "recipe tutorial, the tutorial's arithmetic: fp32 (--faithful)"


@pytest.mark.parametrize("bf16", [True, False])
def test_the_default_recipe_follows_the_arithmetic_a_cpu_trains_in(bf16: bool, toy_dir,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.data.options import DataOptions
    from convnet.training.config import TrainRequest
    from convnet.training.recipes import DEFAULT_RECIPE, RECIPES
    from convnet.training.run import train_run

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: bf16)
    assert make_engine("cpu").recipe_kind == ("cpu" if bf16 else "cpu-fp32")
    assert engine_module.recipe_kind(torch.device("cpu"), "fp32") == "cpu-fp32"  # --precision fp32: fp32's recipe
    assert engine_module.recipe_kind(torch.device("cpu"), "bf16") == "cpu"
    assert Engine(torch.device("cuda")).recipe_kind == "cuda"
    assert RECIPES["cpu-fp32"].model == "fastnet-lean" != RECIPES["cpu"].model
    data = DataOptions(data_dir=toy_dir, subset=64)

    def trained(**settings: object) -> str:
        request = TrainRequest({"epochs": 1, **settings}, data, device="cpu")
        return train_run(request).config.model

    assert trained() == RECIPES[DEFAULT_RECIPE["cpu" if bf16 else "cpu-fp32"]].model
    assert trained(precision="fp32") == "fastnet-lean"
    explicit = TrainRequest({"epochs": 1, "precision": "fp32"}, data, recipe="cpu", device="cpu")
    assert train_run(explicit).config.model == "fastnet"  # a recipe named is the recipe taken
