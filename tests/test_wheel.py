"""The package as a user gets it: the wheel built from this tree, installed into a clean virtual
environment (the CPU torch first, then the wheel from the registry's dependencies), and the main
commands run from it; an extra that is missing is named in one line, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import MVBENCH_TRAIN, REPO, need
from .servers import free_port, groups_of_dev

pytestmark = pytest.mark.e2e


def clean_env() -> dict:
    """This environment without what would let the new venv see this tree (PYTHONPATH, a venv)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def sh(*args, env=None, check=True, timeout=900):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env or clean_env(), timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def test_the_built_wheel_works_as_installed(tmp_path):
    need(MVBENCH_TRAIN)
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO)
    (wheel,) = dist.glob("convlad-*.whl")
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt"]
    sh(*pip, "torch")  # the CPU wheel first, as the README says
    sh(*pip, wheel)
    env = clean_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    convlad = venv / "bin" / "convlad"

    train = tmp_path / "train"
    train.mkdir()
    for p in sorted(MVBENCH_TRAIN.glob("*.jpg"))[::24]:
        (train / p.name).symlink_to(p)
    photos = tmp_path / "photos"
    photos.mkdir()
    group = next(iter(groups_of_dev().values()))
    others = [f for files in list(groups_of_dev().values())[1:4] for f in files]
    for f in [*group[1:], *others]:
        (photos / f.name).symlink_to(f)
    sh(convlad, "train", "--images", train, "--out", tmp_path / "m.npz", "--layer", "block11", "--scales", "1",
       "--k", "8", "--dim", "16", env=env)
    sh(convlad, "index", tmp_path / "m.npz", photos, "--out", tmp_path / "x.index", env=env)
    hits = json.loads(sh(convlad, "search", tmp_path / "x.index", group[0], "--json", env=env).stdout)[0]["results"]
    assert isinstance(hits[0]["inliers"], int)  # re-ranking, the default, works from a plain install
    view = json.loads(sh(convlad, "explain", tmp_path / "x.index", group[0], "--rank", "1", "--json", env=env).stdout)
    assert view["inliers"] == hits[0]["inliers"]
    # serve without its extra: one line that names the extra
    p = sh(convlad, "serve", tmp_path / "x.index", env=env, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "convlad[serve]" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    sh(*pip, f"{wheel}[serve]")
    port = free_port()
    server = subprocess.Popen([str(convlad), "serve", str(tmp_path / "x.index"), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.poll() else "slow"
                time.sleep(0.3)
        for route in ("/", "/static/app.js", "/static/favicon.svg", "/docs", "/api/config"):
            assert httpx.get(f"http://127.0.0.1:{port}{route}").status_code == 200, route
    finally:
        server.terminate()
        server.wait(20)
