"""Usage errors of every command, run as a user would: one line, exit status 2, never a traceback.

The commands are read from the CLI itself, so a command added later is tested without editing this.
"""
import contextlib
import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer

from convlad.cli import app, main

CLI = [sys.executable, "-m", "convlad.cli"]


def _commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _cases():
    """(argv, what) for each command: a missing argument, an unknown option, a wrongly typed value."""
    for path, cmd in _commands():
        required = [p for p in cmd.params if p.required]
        if required:
            yield list(path), "missing argument"
        # fill the required ones so that the parser reaches the bad part
        filled = []
        for p in required:
            filled += ([p.opts[0]] if p.opts and p.opts[0].startswith("-") else []) + ["x"]
        yield [*path, *filled, "--no-such-option"], "unknown option"
        # numeric options, by their default (the parameter objects differ between typer versions)
        typed = [p for p in cmd.params if p.opts and p.opts[0].startswith("-")
                 and isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]
        if typed:
            yield [*path, *filled, typed[0].opts[0], "abc"], "wrongly typed value"


CASES = list(_cases())


def _run(argv):
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)


def _run_here(argv):
    """``convlad.cli.main`` in this process, as the console script calls it: a usage error is
    decided before any work, so this is what a user sees, without a second of import per case."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def results():
    return {tuple(argv): _run_here(argv) for argv, _ in CASES}


def test_in_process_runs_say_what_the_command_says():
    """The first case of each kind also as a user's own process: the same status, the same line."""
    first = {}
    for argv, what in CASES:
        first.setdefault(what, argv)
    with ThreadPoolExecutor(2) as pool:
        real = list(pool.map(_run, first.values()))
    for argv, p in zip(first.values(), real):
        here = _run_here(argv)
        assert (p.returncode, p.stderr.strip()) == (here.returncode, here.stderr.strip()), argv


def test_every_command_is_covered():
    names = {" ".join(path) for path, _ in _commands()}
    assert {"train", "index", "search", "eval", "sweep", "table", "backbones", "datasets download",
            "datasets info"} <= names
    kinds = {what for _, what in CASES}
    assert kinds == {"missing argument", "unknown option", "wrongly typed value"}


@pytest.mark.parametrize("argv,what", CASES, ids=[f"{' '.join(c[0][:2])}-{c[1]}" for c in CASES])
def test_usage_error_is_one_line_and_exit_2(results, argv, what):
    p = results[tuple(argv)]
    assert p.returncode == 2, (argv, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: convlad "), p.stderr
    assert "--help" in lines[0]
    if what == "unknown option":
        assert "--no-such-option" in lines[0]
    if what == "wrongly typed value":
        assert "abc" in lines[0] or "Invalid value" in lines[0]


def test_no_arguments_prints_the_help_and_exits_2():
    p = _run([])
    assert p.returncode == 2 and "Usage" in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_search_with_no_readable_query_exits_2(tmp_path):
    """No query readable: status 2; the bad query is named (the index file is checked first, so an
    unreadable index gives its own one-line error)."""
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    p = _run(["search", str(tmp_path / "missing.index"), str(bad)])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "missing.index" in p.stderr


def test_flags_show_as_flags_in_every_help():
    """A flag takes no value, so its help shows no type (typer's own labels it ``<bool>``); options
    that take a value keep theirs."""
    from typer.testing import CliRunner

    runner, flags = CliRunner(), 0
    for path, cmd in _commands():
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in out, (path, out)
        flags += sum(1 for p in cmd.params if getattr(p, "is_flag", False))
        valued = [p for p in cmd.params if p.opts and p.opts[0].startswith("--") and not getattr(p, "is_flag", False)
                  and isinstance(p.default, int) and not isinstance(p.default, bool)]
        if valued:
            assert "<int>" in out, (path, out)
    assert flags >= 5  # --json, --wait, --full-query ... exist, so the check above checked something
