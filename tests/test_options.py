"""Each option declared once (tests/../src/convnet/options.py): the command line's flags,
the recipe keys and the estimator's parameters are exactly the ones the declarations give
each of them; every flag's help states its default; a wrong value gets the same message
from the command line and from Python."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from convnet.cli.parser import DECLARED, build_parser, main
from convnet.core.errors import ConvnetError
from convnet.core.options import ESTIMATOR, RECIPE, TRAIN, TUNE, Option, declared, taken_by
from convnet.data.options import DataOptions
from convnet.estimator import PARAMS, ConvNetClassifier, EstimatorOptions
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.recipes import RECIPE_FIELDS

TUNE_OWN = {"--param", "--space", "--trials", "--timeout", "--storage", "--study", "--out", "--report"}
OUTPUT = {"--json", "--no-progress"}  # how results are shown: the grammar (tests/test_grammar.py), not options


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags a parser takes (the first spelling of each; --help left out)."""
    return {a.option_strings[-1] if a.option_strings[-1].startswith("--no-") and len(a.option_strings) == 1
            else a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def test_train_takes_exactly_the_declared_flags() -> None:
    assert flags(subparsers()["train"]) == {o.flag_name for o in taken_by(TRAIN, *DECLARED)} | OUTPUT


def test_tune_takes_the_declared_flags_and_its_own() -> None:
    declared_flags = {o.flag_name for o in taken_by(TUNE, *DECLARED)}
    assert flags(subparsers()["tune"]) == declared_flags | TUNE_OWN | OUTPUT
    assert {"--model", "--lr", "--epochs", "--seed", "--val-split", "--data"} <= declared_flags


def test_a_recipe_holds_exactly_the_declared_recipe_settings() -> None:
    assert set(RECIPE_FIELDS) == {o.name for o in taken_by(RECIPE, TrainConfig)}
    assert not {"seed", "val_split", "faithful", "repeats"} & set(RECIPE_FIELDS)  # settings of one run


def test_the_estimator_takes_exactly_the_declared_parameters() -> None:
    names = {o.param_name for o in taken_by(ESTIMATOR, TrainConfig, DataOptions, TrainRequest, EstimatorOptions)}
    assert set(ConvNetClassifier().get_params()) == names == {o.param_name for o in PARAMS}
    assert {"random_state", "validation_fraction"} <= names and not {"seed", "val_split"} & names  # scikit-learn's


def test_every_flag_states_its_default() -> None:
    silent = [f"{name} {a.option_strings[0]}" for name, parser in subparsers().items() for a in parser._actions
              if a.option_strings and a.dest != "help" and "(default:" not in (a.help or "")]
    assert not silent, silent


def test_every_declared_option_has_a_help_and_an_interface() -> None:
    for o in declared(*DECLARED, EstimatorOptions):
        assert o.help and o.takes, o.name


@pytest.mark.parametrize(("flag", "value", "param"), [
    ("--lr", "-1", -1.0), ("--epochs", "0", 0), ("--optimizer", "lbfgs", "lbfgs"), ("--augment", "rotate", "rotate"),
    ("--momentum", "1.5", 1.5), ("--label-smoothing", "1", 1.0), ("--val-split", "1.2", 1.2),
    ("--class-weight", "inverse", "inverse"), ("--model", "resnet9", "resnet9"),
])
def test_a_wrong_value_is_refused_with_one_message_everywhere(flag: str, value: str, param: object,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (option,) = [o for o in declared(TrainConfig) if o.flag_name == flag]
    assert main(["train", "--device", "cpu", flag, value]) == 1
    cli = capsys.readouterr().err.removeprefix("convnet: error: ").strip()
    with pytest.raises(ConvnetError) as refused:
        ConvNetClassifier(**{option.param_name: param}, device="cpu", verbose=0).fit(
            np.zeros((4, 8, 8), np.uint8), [0, 1, 0, 1])
    assert str(refused.value) == cli and (flag in cli or f"{option.name} {value!r}" in cli)


def test_the_checker_of_the_options_can_fail() -> None:
    """The helper the tests above rely on reads a parser's flags, not something else."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--a-b", help="x (default: 1)")
    parser.add_argument("--no-c", action="store_false", dest="c", help="y (default: on)")
    assert flags(parser) == {"--a-b", "--no-c"}
    assert Option("x_y", int, 1, "h").flag_name == "--x-y" and Option("x", int, 1, "h").help_text() == "h (default: 1)"
