"""`convnet tune`: an Optuna study on a validation split, shared by two processes through SQLite;
the recipe it writes reproduces the best trial; pruning through the loop's events; the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.core.errors import ConvnetError
from convnet.data.named import load_dataset
from convnet.data.options import DataOptions
from convnet.tools import tune
from convnet.tools.searchspace import Param, parse_param
from convnet.training.config import TrainConfig
from convnet.training.loop import train
from convnet.training.recipes import RECIPE_FIELDS, read_recipe_file

optuna = pytest.importorskip("optuna")

TRIALS = 6
SMALL = ["--param", "model=seed", "--param", "epochs=1", "--param", "batch_size=32", "--subset", "200"]


@pytest.fixture(scope="module")
def shared_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path, list[str]]:
    """Two `convnet tune` processes started at once on one SQLite study of TRIALS trials."""
    from .conftest import make_dataset_dir

    base = tmp_path_factory.mktemp("tune")
    data = make_dataset_dir(base / "toy")
    storage = f"sqlite:///{base / 'study.db'}"
    command = [sys.executable, "-m", "convnet", "tune", "--device", "cpu", "--data-dir", str(data), "--storage",
               storage, "--study", "toy", "--trials", str(TRIALS), "--out", str(base / "out"), *SMALL]
    # one thread each: two processes that each use every core slow one another threefold (README says so)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = []
    for p in started:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        outputs.append(out)
    return data, storage, base / "out", outputs


def test_two_processes_share_one_study(shared_study: tuple[Path, str, Path, list[str]]) -> None:
    _, storage, out, outputs = shared_study
    study = optuna.load_study(study_name="toy", storage=storage)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert TRIALS <= len(done) <= TRIALS + 2  # each process stops at the total: at most one extra each
    assert len({t.user_attrs["process"] for t in done}) == 2  # both contributed
    assert all(o.count("\ntrial ") + o.startswith("trial ") >= 1 for o in outputs)  # one line per trial, in each
    assert (out / tune.BEST).is_file()


def test_epochs_given_as_a_flag_are_single_passes_as_for_train_and_searched_ones_are_sized() -> None:
    flag = tune.TuneRequest(settings={"epochs": 2, "model": "seed"})
    given = tune.trial_config("cpu-fp32", {"epochs": 2, "model": "seed"}, flag, 200)
    searched = tune.trial_config("cpu-fp32", {"epochs": 2, "model": "seed"}, tune.TuneRequest(), 200)
    assert (given.epochs, given.repeats) == (2, 1)  # convnet train --epochs 2: two passes over the 180 images
    assert (searched.epochs, searched.repeats) == (2, 56)  # the recipe's epochs: about 10,000 images each
    pooled = tune.TuneRequest(data=DataOptions(subset=200, unlabeled="rest"))
    with_pool = tune.trial_config("cpu-fp32", {"epochs": 4, "model": "seed"}, pooled, 200)
    assert (with_pool.epochs, with_pool.repeats) == (10, 56)  # as convnet train --unlabeled: 2.5 times the epochs


def test_the_closing_line_trains_the_recipe_on_the_searchs_own_data() -> None:
    folder = tune.TuneRequest(data=DataOptions(folder="my photos", subset=300), settings={"epochs": 3}, seed=7)
    assert tune.train_command(folder, Path("tune/best.toml")) == (
        "convnet train --recipe tune/best.toml --data 'my photos' --subset 300 --epochs 3 --seed 7")
    assert tune.train_command(tune.TuneRequest(), Path("best.toml")) == "convnet train --recipe best.toml"


def test_the_recipe_reproduces_the_best_trial(shared_study: tuple[Path, str, Path, list[str]],
                                              tmp_path: Path) -> None:
    data, storage, out, _ = shared_study
    study = optuna.load_study(study_name="toy", storage=storage)
    config = read_recipe_file(out / tune.BEST)
    assert config.model == "seed" and config.epochs == study.best_params["epochs"]
    assert config.lr == pytest.approx(study.best_params["lr"], rel=1e-12)
    low, high, images = tune.accuracy_interval(study.best_value, 20)  # 0.1 of 200, held out
    assert low < study.best_value <= high and images == 20
    assert f"(95 % interval {low:.3f}-{high:.3f} on 20 images)" in (out / tune.BEST).read_text()
    assert tune.accuracy_interval(0.96, 100) == pytest.approx((0.902, 0.984, 100), abs=5e-4)  # Wilson's
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trials ran: another thread count sums in another order
    try:
        assert main(["train", "--device", "cpu", "--data-dir", str(data), "--recipe", str(out / tune.BEST),
                     "--val-split", "0.1", "--subset", "200", "--out", str(run), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    kept = json.loads((run / runfolder.CONFIG).read_text())["kept"]  # the epoch train keeps: the trial's score
    assert kept["val_accuracy"] == pytest.approx(study.best_value, abs=0.005)
    assert main(["recipes", str(out / tune.BEST)]) == 0


def test_a_finished_study_writes_its_report_without_training(shared_study: tuple[Path, str, Path, list[str]],
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data, storage, _, _ = shared_study
    before = len(optuna.load_study(study_name="toy", storage=storage).trials)
    assert main(["tune", "--device", "cpu", "--data-dir", str(data), "--storage", storage, "--study", "toy",
                 "--trials", str(TRIALS), "--out", str(tmp_path), "--report", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "0 run by this process" in printed and " on 20 validation images: trials closer than that" in printed
    assert len(optuna.load_study(study_name="toy", storage=storage).trials) == before
    page = (tmp_path / tune.REPORT).read_text()
    assert page.count("<img") == 2 and 'alt="optimisation history"' in page and 'alt="parameter importances"' in page
    assert page.count("<tr>") == before + 1  # a row per trial, and the header


def test_a_process_with_another_search_is_refused(shared_study: tuple[Path, str, Path, list[str]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data, storage, _, _ = shared_study
    assert main(["tune", "--device", "cpu", "--data-dir", str(data), "--storage", storage, "--study", "toy",
                 "--trials", str(TRIALS + 1), *SMALL[:-2], "--subset", "100"]) == 1
    assert "give the same data, recipe and space, or another --study" in capsys.readouterr().err


def test_the_pruner_stops_a_trial_from_the_loops_events(toy_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", toy_dir, subset=100)
    config = TrainConfig(model="seed", optimizer="sgd", lr=0.05, epochs=3, batch_size=32, val_split=0.2)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    stopped = []

    def objective(trial: optuna.Trial) -> float:
        pruning = tune.Pruning(trial)
        result = train(config, ds.train, ds.spec, events=[pruning])
        stopped.append((pruning.pruned_at, len(result.history)))
        raise optuna.TrialPruned()

    study.optimize(objective, n_trials=1)
    assert stopped == [(1, 1)]  # the loop stopped after the epoch the pruner spoke
    (trial,) = study.trials
    assert list(trial.intermediate_values) == [10, 20, 30]  # every tenth of the epochs done: 1 of 3 is 33 %


def test_the_pruner_hears_every_tenth_when_validation_skips_epochs(toy_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", toy_dir, subset=100)
    config = TrainConfig(model="seed", optimizer="sgd", lr=0.05, epochs=3, batch_size=32, val_split=0.2,
                         val_every=2)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: (train(config, ds.train, ds.spec, events=[tune.Pruning(trial)]), 0.0)[1],
                   n_trials=1)
    values = study.trials[0].intermediate_values  # epoch 2 (66 %) reports 10..60, epoch 3 the rest
    assert list(values) == list(range(10, 101, 10)) and values[10] == values[60] != 0


def test_the_space_is_checked_before_any_data_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--device", "cpu", "--data-dir", str(tmp_path / "nodata"), "--param", "model=seed,nope"]) == 1
    assert "--param model: 'nope' cannot be trained: unknown model 'nope'" in capsys.readouterr().err


def test_sigterm_ends_the_search_with_the_best_recipe_so_far(toy_dir: Path, tmp_path: Path) -> None:
    """A search stopped by SIGTERM (a scheduler; a background job, which ignores Ctrl-C) keeps its best."""
    import signal

    search = subprocess.Popen([sys.executable, "-m", "convnet", "tune", "--device", "cpu", "--data-dir", str(toy_dir),
                               "--trials", "50", "--out", str(tmp_path / "out"), *SMALL],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert search.stdout is not None
    for line in search.stdout:  # the second trial's line: the first is kept in the study by then
        if line.startswith("trial 1:"):
            break
    search.send_signal(signal.SIGTERM)
    _, err = search.communicate(timeout=300)
    assert search.returncode == 130, err
    text = (tmp_path / "out" / tune.BEST).read_text()
    assert "the best of " in text and read_recipe_file(tmp_path / "out" / tune.BEST).model == "seed"


def test_a_signal_outside_training_ends_the_search_after_optunas_bookkeeping() -> None:
    """A signal while Optuna stores a finished trial must not interrupt it (that left the study half-written
    and Optuna failing on its own cleanup); it ends the search once the trial is stored."""
    guard = tune._Interrupt()
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        with guard.training():
            seen.append(trial.number)
            return float(trial.number)

    def signal_while_storing(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 1:
            guard.handle(15, None)  # as the SIGTERM handler is called: outside the objective, it must not raise

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=10, callbacks=[signal_while_storing, guard.stop_study])
    assert guard.signalled and seen == [0, 1]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    with pytest.raises(KeyboardInterrupt):  # signalled between trials, no further trial starts
        with guard.training():
            pass
    fresh = tune._Interrupt()
    with pytest.raises(KeyboardInterrupt):  # inside a trial's training, it interrupts at once
        with fresh.training():
            assert fresh.inside
            fresh.handle(15, None)
    assert not fresh.inside


def test_a_storage_being_created_by_another_process_is_opened_again(toy_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started together on a new storage race to make its tables (seen in CI with SQLite): the
    loser's error is Optuna's half-made schema, and it tries again instead of giving up."""
    real, calls = optuna.create_study, []

    def racing(**kwargs: object) -> optuna.Study:
        calls.append(kwargs["storage"])
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num")
        return real(**kwargs)

    monkeypatch.setattr(optuna, "create_study", racing)
    storage = f"sqlite:///{tmp_path / 'new.db'}"
    assert main(["tune", "--device", "cpu", "--data-dir", str(toy_dir), "--storage", storage, "--study", "s",
                 "--trials", "1", "--out", str(tmp_path / "out"), *SMALL]) == 0
    assert calls == [storage, storage] and (tmp_path / "out" / tune.BEST).is_file()


def test_a_storage_that_cannot_be_used_is_not_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def broken(**kwargs: object) -> optuna.Study:
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError) unable to open database file")

    monkeypatch.setattr(optuna, "create_study", broken)
    assert main(["tune", "--device", "cpu", "--data-dir", str(tmp_path / "nodata"), "--storage", "sqlite:///x.db",
                 "--study", "s", "--out", str(tmp_path / "out")]) == 1
    assert calls == [1] and "cannot open the study ((sqlite3.OperationalError) unable to open database file)" \
        in capsys.readouterr().err


def test_search_specs() -> None:
    assert parse_param("lr", "0.01:0.5:log") == Param("lr", "float", 0.01, 0.5, log=True)
    assert parse_param("epochs", "4:12") == Param("epochs", "int", 4, 12)
    assert parse_param("model", "fastnet,resnet20").choices == ("fastnet", "resnet20")
    assert parse_param("batch_size", [64, 128]).choices == (64, 128)
    assert parse_param("momentum", "0.9") == Param("momentum", "fixed", choices=(0.9,))
    assert parse_param("tta", "false").choices == (False,)
    for name, spec, message in [("seed", "1:2", "not a setting a search can change"),
                                ("lr", "0.5:0.1", "LOW must be below HIGH"), ("lr", "0:1:log", "above 0"),
                                ("epochs", "a:b", "'a' is not a int"), ("lr", "1:2:3", "LOW:HIGH or LOW:HIGH:log")]:
        with pytest.raises(ConvnetError, match=message):
            parse_param(name, spec)


@pytest.mark.parametrize(("args", "message"), [
    (["--val-split", "0"], "--val-split must be in (0, 1) for tune"),
    (["--study", "x"], "--study names a study kept in --storage"),
    (["--param", "lr"], "give NAME=SPEC"),
    (["--param", "lr=abc"], "'abc' is not a float"),
    (["--recipe", "nope"], "unknown --recipe 'nope'"),
    (["--space", "/nonexistent/space.toml"], "no such file"),
])
def test_bad_flags_are_one_line_and_write_nothing(args: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--device", "cpu", "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"),
                 *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_without_optuna_tune_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    real = tune.importlib.util.find_spec
    monkeypatch.setattr(tune.importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    assert main(["tune", "--device", "cpu", "--out", str(tmp_path / "o")]) == 1
    assert "convnet tune needs Optuna, which is not installed: pip install 'convnet-toolkit[tune]'" in \
        capsys.readouterr().err


def test_convnet_recipes_names_itself_in_a_bad_files_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 0.1\nnope = 1\n")
    assert main(["recipes", str(bad)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"convnet recipes {bad}: unknown setting nope; a recipe holds "
                                                    f"{', '.join(RECIPE_FIELDS)} (and base)")
    assert main(["recipes", str(tmp_path / "missing.toml")]) == 1
    assert f"convnet recipes {tmp_path / 'missing.toml'}: no such file" in capsys.readouterr().err
