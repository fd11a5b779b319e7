"""No silent minutes: every step of ``train`` shows progress in a terminal, status lines come off a
terminal, and a step whose single unit of work takes long still speaks."""
import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convlad import progress as P

CLI = [sys.executable, "-m", "convlad.cli"]


def _train_args(tmp_path, train_images):
    images = tmp_path / "train"
    images.mkdir()
    for p in train_images[::12]:  # 49 real training photos
        (images / Path(p).name).symlink_to(p)
    return ["train", "--images", str(images), "--out", str(tmp_path / "m.npz"), "--scales", "1,2", "--k", "16",
            "--dim", "32"]


@pytest.mark.e2e
def test_train_in_a_terminal_shows_each_step_within_15_s(tmp_path, train_images):
    args = _train_args(tmp_path, train_images)
    master, slave = pty.openpty()  # left unsized (0×0), as a harness opens it: bars must show anyway
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    out, first = b"", None
    try:
        while time.monotonic() - t0 < 300:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if first is None and b"features (train)" in out:
                    first = time.monotonic() - t0
            elif proc.poll() is not None:
                break
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert first is not None and first < 15, (first, text)
    # every step has its bar: the network's passes, k-means, PCA, the chance level
    for step in ("features (train)", "vocabularies (k-means, k=16)", "PCA-whitening", "chance level"):
        assert step in text, (step, text)
    assert "\r" in text  # bars redraw in place on a terminal


@pytest.mark.e2e
def test_train_off_a_terminal_writes_status_lines(tmp_path, train_images):
    args = _train_args(tmp_path, train_images)
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CONVLAD_STATUS_EVERY": "0.3"})
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    running = [ln for ln in lines if ln.startswith("features (train): running")]
    assert running and any(ln.startswith("features (train): done 49/49 img") for ln in lines), p.stderr
    assert "\r" not in p.stderr  # plain lines for a log, no bar drawing


def test_a_long_unit_of_work_still_speaks_and_a_short_step_says_nothing():
    buf = io.StringIO()
    b = P.StatusLines(total=None, desc="k-means", unit="", file=buf, every=0.1)
    time.sleep(0.55)  # one unit of work, no update: the heartbeat speaks anyway
    b.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 4 and all(ln.startswith("k-means: running") for ln in lines[:-1]), lines
    assert lines[-1].startswith("k-means: done"), lines
    quiet = io.StringIO()
    with P.StatusLines(total=10, desc="quick", unit="img", file=quiet, every=5) as q:
        q.update(10)
    assert quiet.getvalue() == ""


def test_status_lines_count_and_stop(tmp_path):
    buf = io.StringIO()
    b = P.StatusLines(total=8, desc="indexing", unit="img", file=buf, every=0.1)
    b.update(2)
    time.sleep(0.25)
    b.update(6)
    b.close()
    n = len(buf.getvalue().splitlines())
    time.sleep(0.3)  # closed: the heartbeat is gone
    text = buf.getvalue()
    assert len(text.splitlines()) == n
    assert "indexing: running 2/8 img (25%)" in text and text.splitlines()[-1].startswith("indexing: done 8/8 img")
