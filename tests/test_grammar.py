"""One command-line grammar: every subcommand has a description and examples that parse; every
flag states its default; a flag several commands take reads the same in each; every command
that prints results has --json, every one that reads data or trains has --no-progress; a
command that needs a run folder says so. New commands are held to the same rules."""

from __future__ import annotations

import argparse
import shlex

import pytest

from convnet.cli.parser import UsageError, build_parser

NO_JSON = {"serve", "tutorial"}  # a server, and a story told in the terminal (its numbers: OUT/tutorial.json)
NO_PROGRESS = {"serve", "models", "recipes", "datasets"}  # read no data, train nothing
SHARED = ("--json", "--no-progress", "--device", "--top-k", "--min-confidence")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A parser's flags by their first spelling (``--tta`` for ``--tta/--no-tta``), --help left out."""
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_has_a_description_and_examples_that_parse(name: str) -> None:
    parser = subcommands()[name]
    assert parser.description and len(parser.description) > 40, name
    examples = [line.strip() for line in (parser.epilog or "").splitlines() if line.strip().startswith("convnet ")]
    assert examples, f"convnet {name} --help shows no example"
    for example in examples:
        words = shlex.split(example)
        assert words[1] == name, example
        build_parser().parse_args(words[1:])  # raises UsageError on a flag it does not know


def test_every_flag_states_its_default_and_shared_flags_read_the_same() -> None:
    helps: dict[str, set[str]] = {}
    for name, parser in subcommands().items():
        for flag, action in flags(parser).items():
            assert "(default:" in (action.help or ""), f"convnet {name} {flag}"
            if flag in SHARED:
                helps.setdefault(flag, set()).add(action.help or "")
        if "--out" in flags(parser):
            assert flags(parser)["--out"].help.startswith(("the folder", "the run folder")), name  # a folder
    assert set(helps) == set(SHARED) and all(len(texts) == 1 for texts in helps.values()), helps


def test_the_commands_that_print_results_take_json_and_those_that_read_data_no_progress() -> None:
    for name, parser in subcommands().items():
        assert ("--json" in flags(parser)) == (name not in NO_JSON), name
        assert ("--no-progress" in flags(parser)) == (name not in NO_PROGRESS), name


def test_a_command_that_needs_a_run_folder_says_so() -> None:
    for name, parser in subcommands().items():
        runs = [a for a in parser._actions if a.dest == "run"]
        for a in runs:
            assert a.metavar in ("RUN", "RUN|FILE.onnx"), name
            assert ("not an .onnx file" in a.help) == (a.metavar == "RUN"), name


def test_the_rules_can_fail() -> None:
    """The checks above see a flag without a default and an example that does not parse."""
    with pytest.raises(UsageError):
        build_parser().parse_args(["train", "--no-such-flag"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", help="no default stated")
    assert "(default:" not in flags(parser)["--x"].help
