"""The documented commands are real: every `python -m jobs.<name> ...` in
README.md and docs/*.md (fenced or indented, continuation lines joined, also
after `ray job submit ... --`) is run through its job's own `main` up to the
point where the job resolves its config: so its parser takes every flag
(flags, choices, required arguments), its `--config FILE` exists in the
repository (when it is a relative path) and loads, and its `--set` keys and
values and its flags are accepted by the config. Every `make` target the
documents name exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from jobs import _cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(prefix: str, documents=DOCUMENTS) -> list[tuple[str, str]]:
    """(document, command) for every line starting with ``prefix`` (after
    joining continuation lines and dropping a `$ ` prompt or a trailing
    comment)."""
    out = []
    for doc in documents:
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line.strip())
            line = re.sub(r"^\$ ", "", line)
            if prefix.startswith("python") and " -- python -m jobs." in line:
                line = "python" + line.split(" -- python", 1)[1]
            if line.startswith(prefix):
                out.append((doc.relative_to(ROOT).as_posix(), line.split(" #")[0].strip()))
    return out


JOB_COMMANDS = commands("python -m jobs.")


class Resolved(Exception):
    """Raised where the job would resolve its config: everything before it passed."""


def parse_command(command: str, monkeypatch) -> None:
    """Run the job's ``main`` on the command's arguments until its config is
    resolved (with the real ``resolve_config``), or until it parses for a job
    without a config (``jobs.demo``). Raises what the job would raise."""
    words = shlex.split(command)
    module = importlib.import_module(words[2])
    argv = words[3:]
    parse_args = _cli._Parser.parse_args

    def parse_then_maybe_stop(self, args=None, namespace=None):
        parsed = parse_args(self, args, namespace)
        if not hasattr(parsed, "config"):  # no config to resolve: parsing is all there is to check
            raise Resolved()
        return parsed

    def resolve_and_stop(args, flags):
        config = getattr(args, "config", None)
        if config and "://" not in config:
            path = Path(config) if Path(config).is_absolute() else ROOT / config
            assert path.is_file(), f"--config {config}: no such file in the repository"
            args.config = str(path)
        elif config:
            args.config = None  # a remote config cannot be read here; its overrides still are
        _cli.resolve_config(args, flags)  # UsageError on an unknown key or a bad value
        raise Resolved()

    monkeypatch.setattr(_cli._Parser, "parse_args", parse_then_maybe_stop)
    monkeypatch.setattr(module, "resolve_config", resolve_and_stop, raising=False)
    monkeypatch.setattr(module, "setup_logging", lambda *a, **k: None, raising=False)
    module.main(argv)
    raise AssertionError(f"{words[2]} went past its config resolution")


def test_the_readme_shows_every_job():
    jobs = {c.split()[2] for doc, c in JOB_COMMANDS if doc == "README.md"}
    assert {"jobs.prepare", "jobs.train", "jobs.predict", "jobs.score", "jobs.registry"} <= jobs, jobs


def test_there_are_commands_in_the_docs():
    docs = {doc for doc, _ in JOB_COMMANDS}
    assert "README.md" in docs and any(d.startswith("docs/") for d in docs), docs


@pytest.mark.parametrize("doc,command", JOB_COMMANDS, ids=[f"{d}:{c[:90]}" for d, c in JOB_COMMANDS])
def test_documented_command_parses(doc, command, monkeypatch):
    argv = shlex.split(command)[3:]
    if any(flag in argv for flag in ("--help", "-h")):
        module = importlib.import_module(shlex.split(command)[2])
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code in (0, None)
        return
    with pytest.raises(Resolved):
        parse_command(command, monkeypatch)


@pytest.mark.parametrize("command,problem", [
    ("python -m jobs.train --data d --output o --config jobs/configs/demo.yaml --registy r --name n", "unrecognized"),
    ("python -m jobs.train --data d --output o --set train.finetune.epoch=3", "unknown config key"),
    ("python -m jobs.train --data d --output o --set data.batch_size=zero", "data.batch_size"),
    ("python -m jobs.score --model m --images i --output o --batch-size 0", "score.batch_size"),
    ("python -m jobs.train --data d --output o --config jobs/configs/missing.yaml", "no such file"),
    ("python -m jobs.prepare --src s --dst d --overwrite --skip-existing", "contradict"),
])
def test_a_broken_command_is_caught(command, problem, monkeypatch):
    """The check above fails on a misspelt flag, a wrong --set key or value, a
    flag whose value the config refuses, and a missing config file."""
    with pytest.raises((_cli.UsageError, AssertionError)) as caught:
        parse_command(command, monkeypatch)
    assert problem in str(caught.value)


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = {c.split()[1] for _, c in commands("make ") if len(c.split()) > 1}
    assert named, "the documents name no make target"
    assert named <= targets, named - targets
