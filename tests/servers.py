"""A real `convlad serve` process on loopback, for the service and browser tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from .conftest import MVBENCH_DEV, need

CLI = [sys.executable, "-m", "convlad.cli"]
TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args):
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"convlad {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p


def groups_of_dev() -> dict[str, list[Path]]:
    g = json.loads((need(MVBENCH_DEV) / "groups.json").read_text())
    return {k: [MVBENCH_DEV / "images" / f for f in v] for k, v in sorted(g.items()) if len(v) >= 4}


def default_model_and_places(wd: Path, train_images: list[str], places) -> tuple[Path, Path]:
    """The default model (fitted through the suite's eval cache, which holds test_eval's fit) saved
    as ``wd``/model.npz, and a folder ``wd``/photos of links to mvbench-dev's photos of ``places``."""
    from convlad.pipeline import Config, ConvVLAD
    from convlad.study.evalcache import EvalCache

    model = ConvVLAD(Config())
    EvalCache().fit(model, train_images, progress=False)
    model.save(wd / "model.npz")
    (wd / "photos").mkdir()
    for p in sorted((need(MVBENCH_DEV) / "images").glob("*.jpg")):
        if p.name.rsplit("_", 1)[0] in places:
            (wd / "photos" / p.name).symlink_to(p)
    return wd / "model.npz", wd / "photos"


_TRAINED: dict[tuple, bytes] = {}


def build_index(wd: Path, train_images: list[str], n_groups: int = 6) -> tuple[Path, dict[str, list[Path]]]:
    """A small model (scale 1, 32-D) and an index of the photos of a few mvbench-dev groups, each
    group's first photo held out as a query."""
    (wd / "train").mkdir(parents=True)
    for p in train_images[::12]:
        (wd / "train" / Path(p).name).symlink_to(p)
    key = tuple(train_images[::12])
    if key not in _TRAINED:  # the same command gives the same model: trained once a session, then copied
        cli("train", "--images", wd / "train", "--out", wd / "model.npz", "--layer", "block11", "--scales", "1",
            "--k", "16", "--dim", "32")
        _TRAINED[key] = (wd / "model.npz").read_bytes()
    else:
        (wd / "model.npz").write_bytes(_TRAINED[key])
    groups = dict(list(groups_of_dev().items())[:n_groups])
    (wd / "photos").mkdir()
    for files in groups.values():
        for f in files[1:]:
            (wd / "photos" / f.name).symlink_to(f)
    cli("index", wd / "model.npz", wd / "photos", "--out", wd / "photos.index")
    return wd / "photos.index", groups


class Server:
    """``compiled``: the default server, its network compiled at start; else ``--compile off``, which
    spares each test's server the compilation (test_serve runs the compiled one)."""

    def __init__(self, index: Path, *args, env=None, compiled: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = args if compiled else ("--compile", "off", *args)
        self.proc = subprocess.Popen([*CLI, "serve", str(index), "--port", str(self.port), *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"convlad serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("convlad serve did not answer within 90 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def ray_cluster(tmp: Path, nodes: int):
    """A Ray cluster of ``nodes`` nodes on this machine (`ray start --head`, then `ray start --address`
    for each other, separate processes, one CPU each): yields (address, the environment to join it
    with), and stops those nodes only."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    # token authentication, explicitly (Ray ≥ 2.59 turns it on for local clusters whenever a token
    # file exists, and a node without the token cannot join)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    try:
        head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               f"--temp-dir={tmp}", *common], capture_output=True, text=True, env=env)
        assert head.returncode == 0, head.stderr
        for _ in range(nodes - 1):
            worker = subprocess.run([ray_bin, "start", f"--address={address}", *common],
                                    capture_output=True, text=True, env=env)
            assert worker.returncode == 0, worker.stderr
        yield address, env
    finally:
        _stop_cluster([str(tmp), address])


def _stop_cluster(patterns: list[str]) -> None:
    """Stop one test's nodes only: `ray stop` would stop every Ray on the machine. Their processes
    name the head's temporary folder or address on their command lines."""
    pids = set()
    for pat in patterns:
        pids |= {int(x) for x in subprocess.run(["pgrep", "-f", pat], capture_output=True, text=True).stdout.split()}
    pids.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
