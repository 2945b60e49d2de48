"""The README's commands are real: every `python -m jobs.<name> ...` in its code
blocks parses with that job's own parser (flags, choices, required arguments),
its `--set` keys and values are accepted by the config, and every `make`
target it names exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from jobs import _cli
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def commands(prefix: str) -> list[str]:
    """Commands starting with ``prefix`` in the README's code, fenced or indented
    (continuation lines joined; also after ``ray job submit ... --``)."""
    out = []
    for line in README.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\$\s+", "", line.strip())
        if " -- python -m jobs." in line and prefix.startswith("python"):
            line = "python" + line.split(" -- python", 1)[1]
        if line.startswith(prefix):
            out.append(line.split(" #")[0].strip())
    return out


JOB_COMMANDS = commands("python -m jobs.")


class Parsed(Exception):
    def __init__(self, args):
        super().__init__("parsed")
        self.args_ = args


def test_the_readme_shows_every_job():
    jobs = {c.split()[2] for c in JOB_COMMANDS}
    assert {"jobs.prepare", "jobs.train", "jobs.predict", "jobs.score", "jobs.registry"} <= jobs, jobs


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    words = shlex.split(command)
    module = importlib.import_module(words[2])
    argv = words[3:]
    original = _cli._Parser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(_cli._Parser, "parse_args", parse_and_stop)
    if any(flag in argv for flag in ("--help", "-h")):
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code in (0, None)
        return
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    overrides = getattr(parsed.value.args_, "overrides", None) or []
    load_config(None, overrides, {})  # raises on an unknown key or a bad value


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = {c.split()[1] for c in commands("make ") if len(c.split()) > 1}
    assert named, "the README names no make target"
    assert named <= targets, named - targets
