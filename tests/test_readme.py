"""README and docs/ say what the tool does: every command they show parses with the real
parser (a renamed flag fails here), README stays a five-minute read, and its first 60 lines
(install, train, evaluate, predict a folder, serve) run as written on a tiny folder."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from convnet.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "|", ";", "&"}


def shell_lines(text: str) -> Iterator[str]:
    """The lines of the ```sh (or bash, console) blocks of a Markdown page."""
    inside = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip("`").strip() in ("sh", "bash", "console", "shell")
            continue
        if inside:
            yield line


def convnet_commands(line: str) -> Iterator[list[str]]:
    """The convnet command lines in one shell line: `convnet ...`, `.venv/bin/convnet ...`,
    `python -m convnet ...`, `torchrun ... -m convnet ...`; each as its arguments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        for i, word in enumerate(segment):
            if word == "convnet" or word.endswith("/convnet"):
                yield segment[i + 1:]
                break
            if word == "-m" and segment[i + 1:i + 2] == ["convnet"]:
                yield segment[i + 2:]
                break
        segment = []


def shown_commands() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """Every convnet command of README and docs/: the command lines of shell blocks, and the
    mentions in `code` within the text (a command with some of its flags)."""
    lines, mentions = [], []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = str(page.relative_to(ROOT))
        lines += [(f"{name}: {line.strip()}", args) for line in shell_lines(text) for args in convnet_commands(line)]
        mentions += [(f"{name}: {span}", args) for span in re.findall(r"`((?:\.venv/bin/)?convnet [^`]+)`", text)
                     for args in convnet_commands(span)]
    return lines, mentions


def test_every_command_shown_parses() -> None:
    """A command line runs through the real parser; a mention names a command and flags it takes."""
    lines, mentions = shown_commands()
    assert len(lines) >= 40 and len(mentions) >= 100
    assert {args[0] for _, args in lines + mentions if args} >= {
        "train", "evaluate", "predict", "serve", "export", "tune", "inspect", "suggest", "report", "bench", "compare"}
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    wrong = []
    for where, args in lines:
        try:
            parser.parse_args(args)
        except BaseException as e:  # the parser raises UsageError (SystemExit for --help)
            wrong.append(f"{where}\n  does not parse: {e}")
    for where, args in mentions:
        if not args or args[0] not in commands:
            if args and args[0] not in ("--help", "--version"):
                wrong.append(f"{where}\n  no such command: {args[0]}")
            continue
        taken = {flag for action in commands[args[0]]._actions for flag in action.option_strings}
        wrong += [f"{where}\n  convnet {args[0]} takes no {token.split('=')[0]}" for token in args[1:]
                  if token.startswith("--") and token.split("=")[0] not in taken]
    assert not wrong, "\n".join(wrong)


def test_readme_is_short_and_starts_with_what_a_newcomer_needs() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the details into docs/"
    first = "\n".join(lines[:60])
    assert "pip install torch==2.13.0 -e ." in first and "python -m pytest" in first  # install, test
    for page in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / page).is_file(), f"README links to {page}, which does not exist"
    assert [args[0] for args in quick_start()] == ["train", "evaluate", "predict", "serve"]


def quick_start() -> list[list[str]]:
    """The commands of the first shell block after README's install, within its first 60 lines."""
    text = "\n".join(README.read_text(encoding="utf-8").splitlines()[:60])
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "README's first 60 lines hold the install block and the quick start"
    return [args for line in blocks[1].splitlines() for args in convnet_commands(line)]


def _folder(root: Path, per_class: int, rng: np.random.Generator) -> None:
    """Three classes of 8x8 grey pictures a small model tells apart: a bar, a column, a dot."""
    shapes = {"bar": (slice(3, 5), slice(0, 8)), "column": (slice(0, 8), slice(3, 5)),
              "dot": (slice(2, 6), slice(2, 6))}
    for name, where in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (8, 8))
            image[where] = rng.integers(180, 256)
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    commands = quick_start()
    rng = np.random.default_rng(0)
    _folder(tmp_path / "photos", 24, rng)
    unlabelled = tmp_path / "unsorted"
    _folder(unlabelled, 2, rng)
    (tmp_path / "new-photos").mkdir()
    for i, png in enumerate(sorted(unlabelled.rglob("*.png"))):
        png.rename(tmp_path / "new-photos" / f"{i}.png")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as a CPU machine runs it, on any machine
    for args in commands[:-1]:
        p = subprocess.run([sys.executable, "-m", "convnet", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, f"convnet {shlex.join(args)}\n{p.stderr}"
    run = tmp_path / "runs" / "photos"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9  # three shapes: a model that learned tells them apart
    table = (tmp_path / "predictions.csv").read_text().splitlines()
    assert table[0].startswith("path,class,probability") and len(table) == 1 + 6

    serve = commands[-1]
    server = subprocess.Popen([sys.executable, "-m", "convnet", *serve, "--port", "0"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()  # type: ignore[union-attr]
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", first)
        assert found, first + server.stderr.read()  # type: ignore[union-attr]
        picture = np.asarray(Image.open(next((tmp_path / "photos" / "column").iterdir()))).tolist()
        request = urllib.request.Request(found.group(1) + "predict", json.dumps({"images": [picture]}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["predictions"][0]["class"] == "column"
    finally:
        server.terminate()
        server.wait(timeout=60)
